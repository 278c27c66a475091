"""SLTrain and CoLA through the trainer, 2 ranks at ZeRO-3 (the model built partitioned) in bf16,
2 micro-batches per step: SLTrain's stage hands its dense sum to a full-rank stage and its
checkpoint exports as a Hugging Face Llama computing what the factored model computes; CoLA-M
stopped and resumed equals the straight run, its export is this project's own format, which
``generate`` loads and runs; each stage's summary holds measured bytes equal to the formula and
the method's FLOPs per token."""

from __future__ import annotations

import json

import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt import methods
from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.checkpoint.export import checkpoint_config, export_hf, load_model
from lowrank_pt.eval.generate import generate
from lowrank_pt.model.llama import LlamaModel
from lowrank_pt.model.llama import flops_per_token as dense_flops_per_token
from lowrank_pt.tracking.summary import read_summary
from lowrank_pt.zero.partition import default_reduce_bucket

CATEGORIES = ("params", "grads", "optimizer_states", "method_buffers", "master_params")


def recipe(run_dir: str, cache: str, stages: str, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.log_every=1", "train.eval_every=0",
            "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2", f"stages={stages}",
            "engine.precision=bf16", "engine.zero_stage=3", *extra]


SLTRAIN = ("[{name: sparse, method: sltrain, steps: 4, grad_accum: 2, optimizer: {lr: 3.0e-3},"
           "  options: {rank: 8, density: 0.05}}, {name: dense, method: full, steps: 2, optimizer: {lr: 1.0e-3}}]")
COLA = ("[{name: cola, method: cola, steps: 5, grad_accum: 2, optimizer: {lr: 3.0e-3},"
        "  options: {recompute: true}}]")


def declared_flops(cfg, name: str, options: dict) -> int:
    """The FLOPs per token the method declares for the model it builds, 2 sequences per micro-batch."""
    from lowrank_pt.config.recipe import StageConfig

    method = methods.build(StageConfig(method=name, steps=1, options=options), None)
    with torch.device("meta"):
        method.prepare_model(LlamaModel(cfg))
    return method.flops_per_token(cfg, 2 * cfg.seq_len)


def test_sltrain_and_cola_train_resume_and_export_under_zero3(tmp_path, data_cache):
    sparse, straight, resumed = (str(tmp_path / n) for n in ("sltrain", "cola", "cola_resumed"))
    spawn(run_invocations, 2, [recipe(sparse, data_cache, SLTRAIN, "train.report=true"),
                               recipe(straight, data_cache, COLA),
                               recipe(resumed, data_cache, COLA, "train.stop_at_step=2"),
                               recipe(resumed, data_cache, COLA)])
    from lowrank_pt.tracking import metrics

    norms = [r["grad_norm"] for r in metrics.read(sparse) if "loss" in r]  # DeepSpeed's ZeRO optimizer's
    assert len(norms) == 6 and all(0 < n < float("inf") for n in norms)
    report = (tmp_path / "sltrain" / "report" / "report.md").read_text()  # written as the run ended
    assert "## Learning rate" in report and "| sparse |" in report
    assert all((tmp_path / "sltrain" / "report" / f"{p}.png").stat().st_size > 0
               for p in ("loss", "lr", "throughput", "memory"))
    a = losses(sparse)
    assert [s for s, _ in a] == list(range(1, 7)) and a[3][1] < a[0][1]  # SLTrain trains
    b, c = losses(straight), losses(resumed)
    assert [s for s, _ in b] == list(range(1, 6)) and b == c and b[-1][1] < b[0][1]
    wb, wc = final_weights(straight), final_weights(resumed)
    assert wb.keys() == wc.keys() and all(torch.equal(wb[k], wc[k]) for k in wb)
    assert any(k.endswith("q_proj.cola_A") for k in wb) and not any(k.endswith("q_proj.weight") for k in wb)

    for run, name, method, options in ((sparse, "sparse", "sltrain", {"rank": 8, "density": 0.05}),
                                       (straight, "cola", "cola", {"recompute": True})):
        stage = next(s for s in read_summary(run)["stages"] if s["name"] == name)
        measured, formula = stage["memory"]["measured"], stage["memory"]["formula"]
        for category in (*CATEGORIES, "step_cache", "zero_buffers"):
            assert measured.get(category, 0) == formula.get(category, 0), (run, category, measured, formula)
        # ZeRO-3's resident reduce bucket, bf16: the default for the model (5e6 elements for this one)
        assert measured["zero_buffers"] == 2 * default_reduce_bucket(checkpoint_config(checkpoint.complete(run)[0])
                                                                     .hidden_size) == 10**7
        assert (measured.get("step_cache", 0) > 0) == (method == "sltrain")  # the supports, kept on every rank
        cfg = checkpoint_config(checkpoint.complete(run)[0])
        assert stage["flops_per_token"] == declared_flops(cfg, method, options) != dense_flops_per_token(cfg)

    # SLTrain's checkpoint exports as a dense Llama computing what the factored model computes.
    first = checkpoint.complete(sparse)[0]  # the end of the sltrain stage
    meta = checkpoint.read_meta(first)
    assert meta["method"] == "sltrain"
    cfg = checkpoint_config(first)
    options = methods.parse_options("sltrain", meta["method_options"])
    factored = methods.METHODS["sltrain"].build_model(cfg, options)
    factored.load_state_dict(checkpoint.load_weights(first))
    dense_dir = export_hf(first, str(tmp_path / "sltrain_hf"), dtype="float32")
    dense, _ = load_model(dense_dir)
    assert isinstance(dense, LlamaModel) and not any("sltrain" in k for k in dense.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(factored(ids), dense(ids), atol=1e-4)

    # CoLA exports in the project's own format, which generate loads.
    own = export_hf(straight, str(tmp_path / "cola_export"))
    info = json.loads((tmp_path / "cola_export" / "lowrank_pt_model.json").read_text())
    assert info["method"] == "cola" and "generate" in info["loads_with"]
    assert not (tmp_path / "cola_export" / "config.json").exists()  # not a transformers Llama
    model, tokenizer = load_model(own)
    reference, _ = load_model(straight)  # the checkpoint itself
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=2e-2)  # the export is bf16, as the run
    cached = generate(model, tokenizer, "the", max_new_tokens=8, temperature=0.0)
    recomputed = generate(model, tokenizer, "the", max_new_tokens=8, temperature=0.0, use_cache=False)
    assert cached.token_ids == recomputed.token_ids and cached.token_ids
