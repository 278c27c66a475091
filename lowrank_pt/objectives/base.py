"""The language-model objectives: pre-training on packed token windows, and SFT on chat replies.

An objective is the one owner of what a stage's kind decides: the loss of a micro-batch, how
micro-batches are weighted in a step, how many model rows one example of a micro-batch takes,
the data it reads (``data_section``, ``loader``, ``validation_batches``), its validation scores,
and how samples are drawn (plain continuation, or through the chat template). The trainer, the
streams, the methods and the config ask the stage's objective; none of them tests the stage's
``sft`` or ``dpo`` section itself. DPO is ``lowrank_pt.objectives.dpo``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from lowrank_pt.core import dist
from lowrank_pt.data import PackedLoader, chat_template, validation_batches
from lowrank_pt.data.sft import END_PIECE, ROLE_PIECES, SFTLoader, prepare_sft, sft_validation_batches
from lowrank_pt.eval.generate import chat, generate
from lowrank_pt.eval.scores import lm_validation


class LMObjective:
    """Pre-training: the next-token loss over packed windows of the run's (or the stage's) corpus."""

    kind: ClassVar[str] = "lm"
    rows_per_example: ClassVar[int] = 1
    """Model rows one example of a micro-batch trains (``micro_batch_size`` counts examples)."""
    chat: ClassVar[bool] = False
    """Post-training on chat data: scored before the first step, sampled through the chat
    template, with held-out exact-match questions."""
    loader: ClassVar[type] = PackedLoader
    """The training loader class (one interface: ``next_batch``, ``state_dict``)."""
    validation_batches: ClassVar[Any] = staticmethod(validation_batches)
    """``(data, seq_len, micro_batch_size, sequences, rank, world) -> batches``."""
    reply_questions: ClassVar[bool] = False
    """Whether a data file's held-out conversations with a short final reply are exact-match
    questions (SFT; the embedded set's speaker questions serve every chat stage)."""

    def __init__(self, stage: Any = None):
        self.stage = stage

    @staticmethod
    def data_section(stage) -> Any:
        """The stage's own data section of this kind (None: the run's or the stage's corpus)."""
        return None

    @staticmethod
    def data_key(section) -> str:
        """What identifies the prepared data of ``section`` (stages with equal keys share a stream)."""
        return json.dumps(asdict(section), sort_keys=True)

    @staticmethod
    def prepare(section, tokenizer) -> tuple:
        """``(train, validation)`` data of ``section``, prepared (and cached) on this node."""
        raise NotImplementedError("pre-training reads the run's corpus (DataStreams)")

    # --- training ------------------------------------------------------------------------
    def loss(self, engine, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (the model's mean over its target tokens)."""
        return engine(batch["input_ids"].to(engine.device), batch["labels"].to(engine.device))

    def token_weights(self, micro_batches: list[dict]) -> list[float]:
        """Per-micro-batch loss weights; every pre-training micro-batch holds as many targets."""
        return [1.0] * len(micro_batches)

    def window_metrics(self) -> dict:
        """Training scores since the last call, for the log (collective where not empty)."""
        return {}

    # --- evaluation and samples ------------------------------------------------------------
    def evaluate(self, engine, batches: list[dict]) -> dict:
        """Validation scores (``eval/...``) on the stage's held-out batches. Collective."""
        return lm_validation(engine, batches, post_training=self.chat)

    def sample(self, model, tokenizer, prompt: str, **sampling) -> Any:
        """A generation for ``prompt`` (plain continuation here; chat stages use the template)."""
        return (chat if self.chat else generate)(model, tokenizer, prompt, **sampling)

    # --- start of a stage, checkpoints -----------------------------------------------------
    @classmethod
    def check_tokenizer(cls, tokenizer) -> None:
        """The tokenizer has what this objective's data needs (chat stages: the role and end
        pieces; a DataError names a missing one)."""
        if cls.chat and chat_template.uses_template(tokenizer):  # its own template: it must render a turn
            chat_template.encode_reply(tokenizer, [{"role": "user", "content": "Hello"}], "Fine")
        elif cls.chat:
            for piece in (*ROLE_PIECES.values(), END_PIECE):
                tokenizer.piece_id(piece)

    def precompute(self, engine, streams, micro_batch_size: int) -> None:
        """Work done once at a fresh stage's start, before the first step (DPO's reference)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SFTObjective(LMObjective):
    """Supervised fine-tuning: the loss over the answer tokens of chat conversations."""

    kind: ClassVar[str] = "sft"
    chat: ClassVar[bool] = True
    loader: ClassVar[type] = SFTLoader
    validation_batches: ClassVar[Any] = staticmethod(sft_validation_batches)
    reply_questions: ClassVar[bool] = True

    @staticmethod
    def data_section(stage) -> Any:
        return stage.sft

    @staticmethod
    def prepare(section, tokenizer) -> tuple:
        return prepare_sft(section, tokenizer)

    def token_weights(self, micro_batches: list[dict]) -> list[float]:
        """``n_i·k·world / N`` (n_i answer tokens of micro-batch i, k micro-batches, N answer
        tokens of the step on all ranks; collective): DeepSpeed divides by k and averages over
        ranks, so the gradient is that of the mean over all N tokens, however the answers are
        spread over micro-batches and ranks."""
        counts = [int((batch["labels"] != -100).sum()) for batch in micro_batches]
        step_total = dist.all_reduce_sum(float(sum(counts)))
        scale = len(micro_batches) * dist.world_size() / max(step_total, 1.0)
        return [n * scale for n in counts]
