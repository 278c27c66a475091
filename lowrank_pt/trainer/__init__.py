"""The trainer: composes a stage from its parts (``materialise`` in ``zero``, the objective, the
method, the data streams, the tracker, the checkpoint manager) and runs the loop."""
