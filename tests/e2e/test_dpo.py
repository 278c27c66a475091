"""DPO: the loss and its gradients are the formula's, the adapters-off reference is the base model,
pairs batch as the template says, and DPO stages in a recipe (ZeRO-3, 2 ranks) start at log 2,
resume bit-identically mid-stage (both references), log their scores, and with adapters cost no
parameter memory beyond an SFT stage's."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from fixtures import TINY, final_weights, losses, run_invocations, spawn

from lowrank_pt.config.recipe import load
from lowrank_pt.tracking import metrics


def direct_loss(logits, labels, ref_chosen, ref_rejected, beta):
    """-log σ(β((πc - rc) - (πr - rr))), π the summed log-softmax of each labelled token, written
    out position by position."""
    rows = []
    for row in range(logits.shape[0]):
        total = logits.new_zeros(())
        for t in range(logits.shape[1]):
            y = int(labels[row, t])
            if y != -100:
                total = total + logits[row, t, y] - torch.logsumexp(logits[row, t], 0)
        rows.append(total)
    half = len(rows) // 2
    out = logits.new_zeros(())
    for k in range(half):
        margin = beta * ((rows[k] - ref_chosen[k]) - (rows[half + k] - ref_rejected[k]))
        out = out - torch.log(torch.sigmoid(margin))
    return out / half


@pytest.mark.parametrize("pairs,beta", [(1, 0.1), (3, 0.5)])
def test_loss_and_gradients_equal_the_formula(pairs, beta):
    from lowrank_pt.objectives.dpo import dpo_loss, sequence_logps

    g = torch.Generator().manual_seed(pairs)
    logits = torch.randn(2 * pairs, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2 * pairs, 6), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1:, -1] = -100  # padding on some rows
    ref = torch.randn(2 * pairs, generator=g, dtype=torch.float64)
    logps = sequence_logps(logits, labels)
    loss, margins = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta)
    expected = direct_loss(logits, labels, ref[:pairs], ref[pairs:], beta)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert float(expected.detach()) > 0 and grad.abs().max() > 0
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert margins.shape == (pairs,)


def test_adapters_off_is_the_base_model():
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.model.lowrank_linear import adapters_disabled, lowrank_modules, wrap_linears

    torch.manual_seed(0)
    model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 16))
    base = model(ids)
    for dora in (False, True):
        wrapped = LlamaModel(model.cfg).eval()
        wrapped.load_state_dict(model.state_dict())
        wrap_linears(wrapped, None, rank=4, alpha=8, dora=dora)
        with torch.no_grad():
            for _, m in lowrank_modules(wrapped):
                m.lora_B.normal_()
                if dora:
                    m.lora_magnitude.mul_(1.5)
        adapted = wrapped(ids)
        with adapters_disabled(wrapped):
            torch.testing.assert_close(wrapped(ids), base, rtol=0, atol=0)
        assert torch.equal(wrapped(ids), adapted), "adapters back on after the block"
        assert (adapted - base).abs().max() > 1e-2


def test_pair_rows_label_exactly_the_replies(data_cache, tmp_path):
    from lowrank_pt.data import DataConfig, Tokenizer, prepare_data
    from lowrank_pt.data.preference import PreferenceData, preference_batch
    from lowrank_pt.data.sft import SFTData

    tok = Tokenizer(prepare_data(DataConfig(source="embedded", vocab_size=512, max_documents=200,
                                            cache_dir=data_cache), progress=False).tokenizer_path)
    pairs = [{"prompt": "Who says this line?\nGood night, sweet prince.", "chosen": "HORATIO", "rejected": "OSRIC"}]
    batch = preference_batch(PreferenceData(pairs, tok), 48, [0])
    for row, reply in enumerate(("chosen", "rejected")):
        sft = SFTData.from_conversations([[{"role": "user", "content": pairs[0]["prompt"]},
                                           {"role": "assistant", "content": pairs[0][reply]}]], tok)
        ids, trained = sft.examples[0]
        n = len(ids) - 2  # the SFT row also ends with EOS, which is not a target
        assert batch["input_ids"][row, :n].tolist() == ids[:n].tolist()
        labels = batch["labels"][row]
        assert labels[:n].tolist() == [int(t) if f else -100 for t, f in zip(ids[1:n + 1], trained[1:n + 1])]
        assert (labels[n:] == -100).all()
    assert batch["pair_index"].tolist() == [0]


# --- DPO stages in a recipe --------------------------------------------------------------------


def dpo_recipe(run_dir, cache, *extra):
    shakespeare = f"train: shakespeare, max_examples: 200, cache_dir: {cache}"
    lora = "method: lora, options: {rank: 4, alpha: 8}"
    stages = [f"{{name: sft, {lora}, steps: 2, sft: {{{shakespeare}}}}}",
              f"{{name: dpo_lora, {lora}, steps: 2, dpo: {{{shakespeare}, beta: 0.5}}}}",
              f"{{name: dpo_full, method: full, steps: 2, optimizer: {{lr: 1.0e-4}}, dpo: {{{shakespeare}, beta: 0.5}}}}"]
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=3", "train.log_every=1",
            "train.eval_every=0", "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2",
            "train.eval_sequences=4", "train.eval_questions=2", f"stages=[{', '.join(stages)}]", *extra]


def test_dpo_stages_resume_exactly_and_cost_no_reference_memory(tmp_path, data_cache):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # Steps: sft 1-2, dpo_lora 3-4 (adapters-off reference), dpo_full 5-6 (precomputed); each
    # resumed invocation stops after the first step of a DPO stage.
    spawn(run_invocations, 2, [
        dpo_recipe(straight, data_cache),
        dpo_recipe(resumed, data_cache, "train.stop_at_step=3"),
        dpo_recipe(resumed, data_cache, "train.stop_at_step=5"),
        dpo_recipe(resumed, data_cache),
    ])
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 7)) and a == b, "resumed DPO stages differ"
    wa, wb = final_weights(straight), final_weights(resumed)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name

    records = metrics.read(straight)
    by_stage = lambda name: [r for r in records if r.get("stage") == name]  # noqa: E731
    # At a DPO stage's first step the policy is its reference: every margin 0, the loss log 2.
    for name in ("dpo_lora", "dpo_full"):
        first = [r for r in by_stage(name) if "loss" in r][0]
        assert abs(first["loss"] - math.log(2)) < 1e-5, (name, first["loss"])
        assert abs(first["dpo/margin"]) < 1e-5 and first["dpo/accuracy"] <= 1.0
        evals = [r for r in by_stage(name) if "eval/dpo_accuracy" in r]
        assert [r.get("stage_step") for r in evals] == [0, None]
        assert abs(evals[0]["eval/dpo_margin"]) < 1e-5 and 0 <= evals[-1]["eval/policy_preference"] <= 1
    for name in ("sft", "dpo_lora"):
        scored = [r for r in by_stage(name) if "eval/exact_match" in r]
        assert len(scored) == 2 and all(0 <= r["eval/exact_match"] <= 1 for r in scored)
    sft_evals = [r for r in by_stage("sft") if "eval/answer_token_accuracy" in r]
    assert len(sft_evals) == 2 and 0 <= sft_evals[-1]["eval/answer_token_accuracy"] <= 1

    with open(os.path.join(straight, "summary.json")) as f:
        summary = {s["name"]: s for s in json.load(f)["stages"]}
    assert "start_eval_exact_match" in summary["sft"] and "eval_dpo_accuracy" in summary["dpo_lora"]
    # Throughput counts both replies of a pair: 2 steps x (2 pairs x 2 rows x 2 ranks x seq_len).
    seq_len = load(TINY, dpo_recipe(straight, data_cache)).model.seq_len
    assert summary["dpo_lora"]["tokens"] == 2 * summary["sft"]["tokens"] == 2 * (2 * 2 * 2 * seq_len)
    # The adapters-off reference: the DPO stage holds exactly the SFT stage's tensors.
    sft_bytes, dpo_bytes = (summary[n]["memory"]["measured"] for n in ("sft", "dpo_lora"))
    assert sft_bytes["params"] > 0 and sft_bytes["optimizer_states"] > 0
    for key in ("params", "master_params", "optimizer_states", "grads", "method_buffers"):
        assert dpo_bytes[key] == sft_bytes[key], key
