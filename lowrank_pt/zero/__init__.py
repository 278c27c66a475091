"""DeepSpeed ZeRO: the only package that knows DeepSpeed's private attributes and ZeRO-3's
placeholder fields. Everything else reaches params, masters, gradients, moments and partitions
through the named functions here.

- ``engine``: the DeepSpeed config, the partitioned build, ``deepspeed.initialize``;
- ``materialise``: a stage's ready engine from a model builder, a method and the weights it starts from;
- ``state``: every copy of a param, its gradient, its fp32 master and Adam moments, at every stage;
- ``frozen``: edits of frozen bases on each rank's shard (merges, row normalisation);
- ``partition``: what each rank's flat partition holds (fragments of matrices, padding);
- ``saved``: reading DeepSpeed's saved shards (masters, moments) for a reshard;
- ``guard``: the non-finite guard and its hook into the inner optimizer's step;
- ``method_buffers``: a method's frozen tensors held as partitioned params.
"""
