"""lowrank_pt: low-rank pre-training and post-training of language models on DeepSpeed ZeRO."""

__version__ = "0.1.0"
