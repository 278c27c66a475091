"""The bottom layer: process group and collectives (``dist``), the expected-failure types and the
CLI's one error handler (``errors``, ``failures``), the loop's cadence, matrix ownership across
ranks (``owners``) and the phase timer. Imports nothing else of the project."""
