"""What the tests' fork server imports once before it forks any rank (see ``helpers.spawn``).

Importing torch, DeepSpeed and the trainer costs about 4 s a process, and DeepSpeed imports
torch's compiler lazily at its first engine build (2 s more); forks of a server that did it once
pay neither. ``gc.freeze()`` then moves every object made so far out of the collector's sight:
the trainer's ``gc.collect()`` between stages would otherwise walk all of torch's compiler
modules in every rank (0.3 s a call).
"""

import gc

import deepspeed  # noqa: F401
import deepspeed.module_inject  # noqa: F401
import deepspeed.moe  # noqa: F401
import deepspeed.runtime.zero  # noqa: F401
import deepspeed.runtime.zero.muon.original_muon  # noqa: F401 - what imports torch's compiler
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.utils.tensorboard  # noqa: F401

import helpers  # noqa: F401
import lowrank_pt.cli  # noqa: F401
import lowrank_pt.export  # noqa: F401
import lowrank_pt.trainer  # noqa: F401

gc.freeze()
