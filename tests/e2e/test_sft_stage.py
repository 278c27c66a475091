"""An SFT stage in a recipe: trains on the instruction set after pre-training, resumes exactly,
prints samples with the chat template, and scores exact match on an SFT file."""

from __future__ import annotations

import json
import os

import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt.tracking import metrics


def sft_recipe(run_dir, cache, *extra):
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=3", "train.log_every=1",
            "train.eval_every=0", "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2",
            "stages.0.steps=3", "stages.1.steps=5", "stages.1.name=sft", "stages.1.method=lora",
            "stages.1.options={rank: 4, alpha: 8}",
            f"stages.1.sft={{train: shakespeare, max_examples: 400, cache_dir: {cache}}}",
            "train.sample_prompts=[\"Who says this line: 'Good night, sweet prince'\"]", "train.sample_tokens=4",
            "train.eval_questions=2", *extra]


def test_sft_stage_after_pretraining_resumes_exactly(tmp_path, data_cache):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    spawn(run_invocations, 2, [
        sft_recipe(straight, data_cache),
        sft_recipe(resumed, data_cache, "train.stop_at_step=5"),
        sft_recipe(resumed, data_cache),
    ])
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 9)) and a == b
    wa, wb = final_weights(straight), final_weights(resumed)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    with open(os.path.join(straight, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["stage"] for s in samples] == ["warmup", "sft"]


LEADS = {"Hamlet": "HAMLET", "Macbeth": "LADY MACBETH", "Othello": "IAGO", "King Lear": "EDGAR",
         "Twelfth Night": "VIOLA", "The Tempest": "PROSPERO", "As You Like It": "ROSALIND", "Julius Caesar": "BRUTUS"}


def test_exact_match_on_an_sft_file_rises_when_the_model_learns_the_answers(tmp_path, data_cache):
    """The exact-match score of an SFT file, end to end: the trainer asks the held-out short-reply
    conversations at the stage's start and at each evaluation, and the score moves from the
    untrained model's (no better than one answer to all) to all but at most one right once the
    model has learnt the answers. The held-out file holds the training facts themselves: what is
    tested is the scoring (template, greedy decoding, comparison), not generalisation."""
    facts = [{"prompt": f"Who speaks most in {play}?", "response": lead} for play, lead in LEADS.items()]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(f) + "\n" for f in facts * 16))
    val.write_text("".join(json.dumps(f) + "\n" for f in facts))
    run_dir = str(tmp_path / "run")
    stage = (f"stages=[{{name: sft, method: full, steps: 100, optimizer: {{lr: 1.0e-2}}, "
             f"schedule: {{kind: cosine, warmup_steps: 5}}, sft: {{train: {train}, validation: {val}}}}}]")
    spawn(run_invocations, 1, [[f"run_dir={run_dir}", f"data.cache_dir={data_cache}", stage, "train.eval_every=50",
                                "train.tensorboard=false", "train.progress=false", "train.sample_prompts=[]"]])
    with open(os.path.join(run_dir, "summary.json")) as f:
        sft = json.load(f)["stages"][0]
    assert sft["start_eval_exact_match_constant"] == sft["eval_exact_match_constant"] == 1 / len(LEADS)
    assert sft["start_eval_exact_match"] <= 1 / len(LEADS)
    assert sft["eval_exact_match"] >= 1 - 1 / len(LEADS) and sft["eval_distinct_answers"] >= len(LEADS) - 1
    scored = [r["eval/exact_match"] for r in metrics.read(run_dir) if "eval/exact_match" in r]
    assert len(scored) == 3 and scored[-1] == sft["eval_exact_match"]
