"""The data streams of a run's stages: one loader per distinct data and micro-batch size.

Pre-training stages read token shards, SFT stages instruction data, DPO stages preference pairs;
the loaders share one interface and save plain-int cursors, so a resumed run sees exactly the
batches it would have seen. Also what a stage's evaluation reads: its fixed validation batches and,
for post-training, its held-out exact-match questions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

from lowrank_pt.core import dist
from lowrank_pt.data import Tokenizer, TokenShard, check_tokenizer, prepare_data
from lowrank_pt.data.preference import preference_batch, speaker_questions
from lowrank_pt.data.sft import SHAKESPEARE, SHAKESPEARE_TASKS, encode_prompt
from lowrank_pt.eval.scores import ANSWER_TOKENS, reply_questions
from lowrank_pt.objectives import objective_class

logger = logging.getLogger(__name__)


def on_local_rank0_first(build):
    """Run ``build`` on each node's local rank 0, then on the other ranks, which find its cache."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank == 0:
        result = build()
    dist.barrier()
    if local_rank != 0:
        result = build()
    return result


class DataStreams:
    """One loader per distinct (data config, micro-batch): stages that share data continue
    one stream instead of re-reading its start."""

    def __init__(self, run, seq_len: int, tokenizer: Tokenizer):
        self.run = run
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.loaders: dict[str, object] = {}
        self.prepared: dict[str, tuple] = {}
        self.saved: dict[str, dict] = {}

    def _prepared(self, stage) -> tuple[str, tuple]:
        """(key, (train, validation)) of the stage's data, built once per node."""
        objective = objective_class(stage)
        section = objective.data_section(stage)
        if section is not None:
            key = f"{objective.kind}:{objective.data_key(section)}"
            build = lambda: objective.prepare(section, self.tokenizer)  # noqa: E731
        else:
            data = stage.data or self.run.data
            key = json.dumps(asdict(data), sort_keys=True)

            def build():
                prepared = prepare_data(data, progress=dist.rank() == 0)
                shards = TokenShard(prepared.train_shard), TokenShard(prepared.val_shard)
                for shard in shards:
                    check_tokenizer(shard, self.tokenizer)
                return shards

        if key not in self.prepared:
            self.prepared[key] = on_local_rank0_first(build)
        return key, self.prepared[key]

    def train(self, stage, micro_batch_size: int):
        key, (train, _) = self._prepared(stage)
        key = f"{key}|mb={micro_batch_size}"
        if key not in self.loaders:
            loader = objective_class(stage).loader(train, self.seq_len, micro_batch_size, dist.rank(),
                                                   dist.world_size(), self.run.seed)
            if key in self.saved:
                loader.load_state_dict(self.saved[key])
            self.loaders[key] = loader
        return self.loaders[key]

    def validation(self, stage, micro_batch_size: int) -> list[dict]:
        """The stage's fixed validation batches: ``eval_sequences`` (the stage's, else the run's)
        sequences, conversations or pairs."""
        _, (_, val) = self._prepared(stage)
        count = stage.eval_sequences if stage.eval_sequences is not None else self.run.train.eval_sequences
        batches = objective_class(stage).validation_batches(val, self.seq_len, micro_batch_size, count, dist.rank(),
                                                            dist.world_size())
        # Every rank must run the same number of forwards (ZeRO-3 gathers are collective).
        return batches[:dist.min_over_ranks(len(batches))]

    def reference_batches(self, stage, micro_batch_size: int) -> dict[str, tuple[int, list[dict]]]:
        """DPO: batches covering every pair of the training and validation sets that fits, the
        same on every rank (where a precomputed reference is computed from)."""
        _, (train, val) = self._prepared(stage)
        out = {}
        for split, data in (("train", train), ("val", val)):
            kept = data.fits(self.seq_len)
            out[split] = (len(data), [preference_batch(data, self.seq_len, kept[i:i + micro_batch_size])
                                      for i in range(0, len(kept), micro_batch_size)])
        return out

    def questions(self, stage) -> list:
        """Held-out exact-match questions ``(prompt ids, answer)`` of a post-training stage
        (``train.eval_questions`` of them): on the shakespeare set its "who says this line"
        questions, asked as one user message (a set without them: as a file); on SFT data files
        the held-out conversations whose
        final reply takes at most ``ANSWER_TOKENS`` tokens (short answers: a name, a label, a
        number); none for DPO files."""
        objective = objective_class(stage)
        section = objective.data_section(stage)
        count = self.run.train.eval_questions
        if section is None or count < 1:
            return []
        if section.train == SHAKESPEARE and section.validation is None and "who" in getattr(section, "tasks", SHAKESPEARE_TASKS):
            asked = on_local_rank0_first(lambda: speaker_questions(section.cache_dir, section.max_examples,
                                                                   section.seed, count))
            return [(encode_prompt(self.tokenizer, [{"role": "user", "content": prompt}]), speaker)
                    for prompt, speaker in asked]
        if not objective.reply_questions:
            return []
        _, (_, val) = self._prepared(stage)
        questions = reply_questions(val, self.tokenizer, self.seq_len, count)
        if not questions:
            logger.warning("stage %r: no exact match: none of the %d held-out conversations of %s ends with a "
                           "reply of at most %d tokens", stage.name, len(val), val.path, ANSWER_TOKENS)
        return questions

    def state_dict(self) -> dict:
        return {**self.saved, **{k: v.state_dict() for k, v in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state)
        for key, loader in self.loaders.items():
            if key in state:
                loader.load_state_dict(state[key])
