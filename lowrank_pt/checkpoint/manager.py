"""The one checkpoint path of a run: what a checkpoint holds beside the engine's own state, and
where each part comes from and goes back to.

The client state is gathered from its owners, each of which has ``state_dict`` and
``load_state_dict`` (plain data and tensors, never objects): the trainer's counters, the method
(restarts, refreshes, subspaces), the data streams (cursors), the objective (DPO's reference
tables). ``meta.json`` records what a resume or an ``init_from`` checks before any work: the
stage, the model's shape, the layout, the precision, the method and the tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from lowrank_pt.checkpoint import reshard
from lowrank_pt.checkpoint import store as checkpoint


class CheckpointManager:
    """Saves and loads the checkpoints of one run (``run``: its config; ``model_cfg``, ``tokenizer``:
    what its weights and token ids mean)."""

    def __init__(self, run, world_size: int, model_cfg, tokenizer):
        self.run = run
        self.world_size = world_size
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer

    def save(self, engine, trainer_state: dict, owners: dict) -> str:
        """A complete checkpoint of the stage ``trainer_state["stage_index"]`` at ``trainer_state``
        (stage step, global step, tokens), with each owner's state under its key. Collective;
        returns the checkpoint dir."""
        run, stage = self.run, self.run.stages[trainer_state["stage_index"]]
        meta = {**trainer_state, "stage_name": stage.name, "model": asdict(self.model_cfg),
                "world_size": self.world_size, "zero_stage": run.engine.zero_stage,
                "precision": run.engine.precision, "method": stage.method, "method_options": dict(stage.options),
                "state_dtype": stage.optimizer.state_dtype,
                "tokenizer": os.path.abspath(self.tokenizer.path), "tokenizer_sha256": self.tokenizer.sha256}
        client = {"trainer": {**trainer_state, "stage_name": stage.name},
                  **{key: owner.state_dict() for key, owner in owners.items()}}
        return checkpoint.save(engine, run.run_dir, trainer_state["global_step"], meta, client, run.train.keep_last)

    def load(self, engine, path: str, method, owners: dict, say=print) -> dict:
        """Load ``path`` into the fresh ``engine`` (on another layout: converted) and each owner's
        state back into it; returns the trainer's state (``stage_step``, ...). Collective."""
        client = reshard.load(engine, path, method, say)
        for key, owner in owners.items():
            owner.load_state_dict(client.get(key, {}))
        return client["trainer"]
