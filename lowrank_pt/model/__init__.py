"""The model: the LLaMA architecture and its named sizes (``llama``), which linears a method
targets (``targets``) and the low-rank linear that adapters and ReLoRA train (``lowrank_linear``)."""
