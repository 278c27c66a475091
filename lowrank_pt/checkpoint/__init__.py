"""Weights in and out of a run: DeepSpeed checkpoints with their manifest and client state
(``store``), which checkpoint a run resumes from (``resume``), loading onto another world size or
ZeRO stage (``reshard``), and Hugging Face export and import (``export``)."""
