"""lowrank_pt: low-rank pre-training and post-training of language models on DeepSpeed ZeRO."""

import os as _os

__version__ = "0.1.0"

# DeepSpeed probes for an accelerator on import and prints a warning to stdout when it falls back
# to the CPU; naming the CPU up front keeps command output (config-reference, generate) clean.
if "DS_ACCELERATOR" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["DS_ACCELERATOR"] = "cpu"
