"""Direct preference optimisation: the loss of a ``dpo`` stage, its reference model and its scores.

For a pair (prompt x, chosen y_c, rejected y_r), with π(y|x) the summed log-probability of a reply
under the trained model and ref(y|x) under the reference (the model as the stage starts)::

    loss = -log σ(β·((π_c - ref_c) - (π_r - ref_r)))        rewards r = β·(π - ref)

averaged over the step's pairs (every micro-batch holds ``micro_batch_size`` pairs, so DeepSpeed's
mean over micro-batches and ranks is the mean over pairs).

The reference costs no model memory in either case:

- ``adapters``: a stage whose method trains adapters on a base it never changes (``lora`` with
  ``init: kaiming``, DoRA included: ``B = 0`` at the start, so the base alone *is* the stage's
  starting model) takes the reference from the same network with its adapters switched off
  (``lowrank.adapters_disabled``), one extra no-grad forward per micro-batch.
- ``precomputed``: any other method (full-rank, relora, galore, a LoRA init that moves the base)
  has no such network, so the reference log-probs of every training and validation pair are
  computed once at the stage's start, 2 floats per pair, kept with the objective and saved in
  checkpoints (a resumed stage reads them back instead of recomputing them from moved weights).
  That costs one forward over the pairs at the start, on every rank (each computes every pair,
  so the tables agree without communication).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lowrank_pt.core import dist
from lowrank_pt.data.preference import PreferenceLoader, preference_validation_batches, prepare_preferences
from lowrank_pt.model.lowrank_linear import adapters_disabled
from lowrank_pt.objectives.base import LMObjective


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (labels -100 are ignored), in fp32 at
    least (bf16 logits are promoted)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """``(mean loss, per-pair reward margins)`` of DPO over pairs."""
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margins).mean(), margins


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


class DPOObjective(LMObjective):
    """The loss the method's ``train_step`` takes for each micro-batch of a ``dpo`` stage: a
    micro-batch of n pairs trains 2n rows (chosen, then rejected)."""

    kind: ClassVar[str] = "dpo"
    rows_per_example: ClassVar[int] = 2
    chat: ClassVar[bool] = True
    loader: ClassVar[type] = PreferenceLoader
    validation_batches: ClassVar[Any] = staticmethod(preference_validation_batches)

    def __init__(self, stage: Any = None, beta: float = 0.1, reference: str = "precomputed"):
        super().__init__(stage)
        if reference not in ("adapters", "precomputed"):
            raise ValueError(f"reference={reference!r}: adapters or precomputed")
        self.beta = float(beta)
        self.reference = reference
        self.tables: dict[str, torch.Tensor] = {}
        """precomputed: ``split -> [pairs, 2]`` reference log-probs (chosen, rejected) by pair index."""
        self._window = torch.zeros(3, dtype=torch.float64)  # sum of accuracy, sum of margins, pairs

    # --- the reference ---------------------------------------------------------------------
    @torch.no_grad()
    def _logps_without_adapters(self, engine, batch) -> torch.Tensor:
        was_training = engine.module.training
        engine.module.eval()  # the reference is deterministic: no adapter dropout anyway, no other
        try:
            with adapters_disabled(engine.module):
                logits = engine(batch["input_ids"].to(engine.device))
        finally:
            engine.module.train(was_training)
        return sequence_logps(logits, batch["labels"].to(engine.device))

    def reference_logps(self, engine, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference == "adapters":
            return _split(self._logps_without_adapters(engine, batch))
        table = self.tables[split][batch["pair_index"]].to(engine.device)
        return table[:, 0], table[:, 1]

    @staticmethod
    def data_section(stage) -> Any:
        return stage.dpo

    @staticmethod
    def data_key(section) -> str:
        """The pairs' data: ``beta`` changes the loss, not the data."""
        return json.dumps({k: v for k, v in asdict(section).items() if k != "beta"}, sort_keys=True)

    @staticmethod
    def prepare(section, tokenizer) -> tuple:
        return prepare_preferences(section, tokenizer)

    @torch.no_grad()
    def precompute(self, engine, streams, micro_batch_size: int) -> None:
        """precomputed: the reference log-probs of every pair, from the engine's weights now (the
        stage's start), over ``streams.reference_batches``: split -> (number of pairs, batches
        covering every pair). Every rank runs every batch. Nothing to do with the adapters reference."""
        if self.reference != "precomputed":
            return
        batches_by_split = streams.reference_batches(self.stage, micro_batch_size)
        was_training = engine.module.training
        engine.module.eval()
        try:
            for split, (count, batches) in batches_by_split.items():
                table = torch.zeros(count, 2, dtype=torch.float32)
                for batch in batches:
                    logits = engine(batch["input_ids"].to(engine.device))
                    chosen, rejected = _split(sequence_logps(logits, batch["labels"].to(engine.device)))
                    table[batch["pair_index"]] = torch.stack([chosen, rejected], 1).float().cpu()
                self.tables[split] = table
        finally:
            engine.module.train(was_training)

    # --- training --------------------------------------------------------------------------
    def loss(self, engine, batch) -> torch.Tensor:
        ref_chosen, ref_rejected = self.reference_logps(engine, batch, "train")
        logits = engine(batch["input_ids"].to(engine.device))
        chosen, rejected = _split(sequence_logps(logits, batch["labels"].to(engine.device)))
        loss, margins = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        m = margins.detach().double().cpu()
        self._window += torch.tensor([float((m > 0).sum()), float(m.sum()), float(m.numel())], dtype=torch.float64)
        return loss

    def window_metrics(self) -> dict:
        """``dpo/accuracy`` (share of pairs whose reward margin is positive) and ``dpo/margin``
        (mean reward margin) over the training pairs since the last call, all ranks. Collective."""
        totals = dist.all_reduce_sum_(self._window.clone()) if dist.world_size() > 1 else self._window.clone()
        self._window.zero_()
        if totals[2] == 0:
            return {}
        return {"dpo/accuracy": float(totals[0] / totals[2]), "dpo/margin": float(totals[1] / totals[2])}

    @torch.no_grad()
    def evaluate(self, engine, batches: list[dict]) -> dict:
        """On held-out pairs: ``eval/loss`` (DPO's), ``eval/dpo_accuracy``, ``eval/dpo_margin`` and
        ``eval/policy_preference`` (the share of pairs where the model itself finds the chosen
        reply likelier, whatever the reference: the score that means something at step 0).
        Collective; the engine in eval mode."""
        sums = torch.zeros(5, dtype=torch.float64)  # loss·pairs, right, margins, chosen likelier, pairs
        for batch in batches:
            ref_chosen, ref_rejected = self.reference_logps(engine, batch, "val")
            logits = engine(batch["input_ids"].to(engine.device))
            chosen, rejected = _split(sequence_logps(logits, batch["labels"].to(engine.device)))
            loss, margins = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
            n = margins.numel()
            sums += torch.tensor([float(loss) * n, float((margins > 0).sum()), float(margins.sum()),
                                  float((chosen > rejected).sum()), n], dtype=torch.float64)
        if dist.world_size() > 1:
            sums = dist.all_reduce_sum_(sums)
        pairs = max(float(sums[4]), 1.0)
        return {"eval/loss": float(sums[0]) / pairs, "eval/dpo_accuracy": float(sums[1]) / pairs,
                "eval/dpo_margin": float(sums[2]) / pairs, "eval/policy_preference": float(sums[3]) / pairs}

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"tables": {k: v.clone() for k, v in self.tables.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.reference == "precomputed":
            if not state.get("tables"):
                raise ValueError("this checkpoint of a dpo stage holds no reference log-probs to resume with")
            self.tables = {k: v.clone() for k, v in state["tables"].items()}
