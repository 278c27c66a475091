"""SFT loss: the mean over every answer token of the optimizer step, across micro-batches and
ranks, however unevenly the answers are spread."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fixtures import spawn, tiny_engine

from lowrank_pt.objectives import SFTObjective

VOCAB = 64


def uneven_batches(rank: int, answers: list[int]) -> list[dict]:
    """One micro-batch per entry of ``answers``: that many target tokens (the rest -100)."""
    g = torch.Generator().manual_seed(10 + rank)
    out = []
    for n in answers:
        ids = torch.randint(0, VOCAB, (2, 17), generator=g)
        labels = ids[:, 1:].clone()
        mask = torch.ones_like(labels, dtype=torch.bool).flatten()
        mask[:n] = False
        labels.view(-1)[mask] = -100
        out.append({"input_ids": ids[:, :-1], "labels": labels})
    return out


def sft_method():
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.data.sft import SFTDataConfig
    from lowrank_pt.methods import Method

    class Recording(Method):
        def before_optimizer_step(self, engine, step):
            self.grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}

    stage = StageConfig(steps=10, sft=SFTDataConfig(), optimizer=OptimizerConfig(lr=1e-2),
                        schedule=ScheduleConfig(kind="constant"))
    return Recording(None, stage, None)


def weighting_worker(rank, world):
    answers = [[3, 29], [12, 7]][rank]  # answer tokens per micro-batch, per rank
    batches = uneven_batches(rank, answers)
    method = sft_method()
    weights = SFTObjective(method.stage).token_weights(batches)
    engine, method = tiny_engine(0, "fp32", method=method, grad_accum=len(batches), vocab_size=VOCAB)
    reference = copy.deepcopy(engine.module)
    loss = method.train_step(engine, batches, 0)
    return {"weights": weights, "answers": answers, "loss": loss,
            "grads": {n: g for n, g in method.grads.items()},
            "sums": [float(F.cross_entropy(reference(b["input_ids"]).float().view(-1, VOCAB), b["labels"].reshape(-1),
                                           ignore_index=-100, reduction="sum")) for b in batches]}


def test_sft_step_weights_answer_tokens_across_micro_batches_and_ranks():
    results = spawn(weighting_worker, 2)
    total = sum(sum(r["answers"]) for r in results)
    for r in results:  # w_i = n_i · k · world / N
        assert r["weights"] == pytest.approx([n * 2 * 2 / total for n in r["answers"]])
    # The step's loss, averaged over ranks as the trainer logs it, is the mean over all answer tokens.
    token_mean = sum(sum(r["sums"]) for r in results) / total
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(token_mean, rel=1e-5)
    # Plain per-micro-batch means would weigh the 3-token answer like the 29-token one.
    plain = sum(s / n for r in results for s, n in zip(r["sums"], r["answers"])) / 4
    assert abs(plain - token_mean) > 1e-3


def gradient_worker(rank, world):
    batches = uneven_batches(rank, [3, 29])
    engine, method = tiny_engine(0, "fp32", method=sft_method(), grad_accum=2, vocab_size=VOCAB)
    reference = copy.deepcopy(engine.module)
    method.train_step(engine, batches, 0)
    total = sum(int((b["labels"] != -100).sum()) for b in batches)
    loss = sum(F.cross_entropy(reference(b["input_ids"]).float().view(-1, VOCAB), b["labels"].reshape(-1),
                               ignore_index=-100, reduction="sum") for b in batches) / total
    loss.backward()
    return max(float((method.grads[n] - p.grad).abs().max()) for n, p in reference.named_parameters())


def test_sft_gradient_is_that_of_the_token_mean():
    (err,) = spawn(gradient_worker, 1)
    assert err < 1e-6
