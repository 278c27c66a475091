"""Adapters out: LoRA SFT stages post-training an imported GQA model (``model.size: init_from``), their
checkpoints exported with ``--adapter``: ``peft.PeftModel.from_pretrained(base, adapter)`` gives our
trained model's logits to float rounding for kaiming, pissa (a rank-2r LoRA against the original
base) and DoRA, and for a stage whose base came from an earlier stage of the run (written beside
the adapter); a stage that trains full-rank params is refused."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import TINY, spawn

from lowrank_pt.checkpoint.export import export_hf, load_model
from lowrank_pt.checkpoint.peft_export import export_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def base_model(path):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    return str(path)


def train(rank, world_size, invocations):
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    for overrides in invocations:
        Trainer(load(TINY, overrides)).run_all()


def recipe(run_dir, cache, stages, *extra):
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "model.seq_len=128", "train.micro_batch_size=2",
            "train.eval_every=0", "train.tensorboard=false", "train.progress=false", f"stages={stages}", *extra]


LORA = "{{name: sft, method: lora, steps: 3, {init}options: {{rank: 4, train_full_rank: {full}{opts}}}, " \
       "optimizer: {{lr: 5.0e-2}}, sft: {{train: shakespeare, max_examples: 64}}}}"
"""An SFT stage (the corpus-derived instructions, our tokenizer's chat pieces) with LoRA."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("peft")
    base = base_model(root / "base")
    init = f"init_from: {base}, "
    runs = {
        "kaiming": [LORA.format(init=init, full="false", opts="")],
        "pissa": [LORA.format(init=init, full="false", opts=", init: pissa")],
        "dora": [LORA.format(init=init, full="false", opts=", dora: true")],
        "full_rank": [LORA.format(init=init, full="true", opts="")],
    }
    invocations = [recipe(root / name, data_cache, f"[{stages[0]}]", "model.size=init_from")
                   for name, stages in runs.items()]
    # a base from the run's own first stage: no init_from for the adapter to point to
    invocations.append(recipe(root / "handed", data_cache, "[{name: pre, method: full, steps: 2}, "
                              + LORA.format(init="", full="false", opts="") + "]", "model.size=tiny"))
    spawn(train, 1, invocations)
    return root, base


def peft_logits(adapter_dir, ids):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).float()
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits, config


@pytest.mark.parametrize("name", ["kaiming", "pissa", "dora", "handed"])
def test_peft_loads_the_adapter_with_our_logits(runs, name):
    root, base = runs
    adapter = root / f"{name}-adapter"
    export_adapter(str(root / name), str(adapter), dtype="float32")
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(4))
    theirs, config = peft_logits(adapter, ids)
    ours, _ = load_model(str(root / name))
    with torch.no_grad():
        ours = ours(ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert config["peft_type"] == "LORA" and config["modules_to_save"] is None
    assert config["r"] == (8 if name == "pissa" else 4) and config["use_dora"] == (name == "dora")
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    assert (config["base_model_name_or_path"] == base) == (name != "handed")
    untrained = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).float()
    with torch.no_grad():
        assert (untrained(ids).logits - ours).abs().max() > 1e-3  # the adapter carries the training


def test_a_stage_that_trains_full_rank_params_is_refused_and_exports_merged(runs, tmp_path):
    root, _ = runs
    with pytest.raises(ValueError, match="train_full_rank"):
        export_adapter(str(root / "full_rank"), str(tmp_path / "adapter"))
    merged = export_hf(str(root / "full_rank"), str(tmp_path / "merged"), max_shard_bytes=100_000)
    assert len(list((tmp_path / "merged").glob("model-*-of-*.safetensors"))) > 1  # sharded with an index
    back = transformers.AutoModelForCausalLM.from_pretrained(merged).float().eval()
    ours, _ = load_model(str(root / "full_rank"))
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
