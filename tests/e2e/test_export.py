"""Export of a 2-rank ZeRO-3 checkpoint to the Hugging Face Llama layout: transformers loads it and
gives our logits, the tokenizer encodes as ours, adapters are merged, import round-trips bitwise."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from fixtures import TINY, spawn

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.checkpoint.export import checkpoint_config, export_hf, import_hf, load_model, save_hf
from lowrank_pt.checkpoint.cli import register as register_export
from lowrank_pt.checkpoint.store import load_plain_weights
from lowrank_pt.cli import register_generate
from lowrank_pt.data import DataConfig, Tokenizer, TokenShard, prepare_data, validation_batches
from lowrank_pt.data.sft import encode_conversations
from lowrank_pt.eval.generate import generate
from lowrank_pt.model.llama import LlamaModel
from lowrank_pt.tracking import metrics

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ_LEN, MICRO, EVAL_SEQUENCES = 64, 2, 4


def train(rank, world_size, overrides):
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    return Trainer(load(TINY, overrides)).run_all()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    """Two ranks, ZeRO-3: a full-rank stage, then a LoRA stage (adapters in the final checkpoint)."""
    run_dir = str(tmp_path_factory.mktemp("export") / "run")
    spawn(train, 2, [
        f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "engine.zero_stage=3",
        f"train.micro_batch_size={MICRO}", f"train.eval_sequences={EVAL_SEQUENCES}", "train.tensorboard=false",
        "train.progress=false", "stages.0.steps=2", "stages.1.steps=2", "stages.1.method=lora",
        "stages.1.options.rank=4", "stages.1.optimizer.lr=0.05",
    ])
    return run_dir


@pytest.fixture(scope="module")
def tokenizer(data_cache):
    return Tokenizer(prepare_data(DataConfig(source="embedded", vocab_size=512, max_documents=200,
                                             cache_dir=data_cache), progress=False).tokenizer_path)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-pt")
    sub = parser.add_subparsers(dest="command", required=True)
    register_export(sub)
    register_generate(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def eval_loss(model: LlamaModel, data_cache: str) -> float:
    """The trainer's validation loss (2 ranks' batches, mean over ranks) computed with ``model``."""
    shard = TokenShard(prepare_data(DataConfig(source="embedded", vocab_size=512, max_documents=200,
                                               cache_dir=data_cache), progress=False).val_shard)
    per_rank = []
    with torch.no_grad():
        for rank in range(2):
            batches = validation_batches(shard, SEQ_LEN, MICRO, EVAL_SEQUENCES, rank, 2)
            per_rank.append(sum(model(b["input_ids"], b["labels"]).item() for b in batches) / len(batches))
    return sum(per_rank) / 2


def logged_eval_loss(run_dir: str, stage: str) -> float:
    return [r["eval/loss"] for r in metrics.read(run_dir) if "eval/loss" in r and r["stage"] == stage][-1]


def hf_logits(out_dir: str, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_export_of_zero3_checkpoint_loads_in_transformers(run_dir, data_cache, tokenizer, tmp_path, capsys):
    ckpt = checkpoint.complete(run_dir)[0]  # end of the full-rank stage
    out = str(tmp_path / "hf")
    assert cli(["export", ckpt, "--out", out]) == 0

    config = json.loads(open(os.path.join(out, "config.json")).read())
    cfg = checkpoint_config(ckpt)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == config["num_attention_heads"] == cfg.num_heads
    assert config["max_position_embeddings"] == cfg.seq_len == SEQ_LEN
    assert (config["rms_norm_eps"], config["tie_word_embeddings"]) == (cfg.norm_eps, cfg.tie_embeddings)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    names = set(safetensors_torch.load_file(os.path.join(out, "model.safetensors")))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= names

    model = LlamaModel(cfg)
    model.load_state_dict(load_plain_weights(ckpt))
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(hf_logits(out, ids), ours, rtol=1e-5, atol=1e-5)
    assert eval_loss(model, data_cache) == pytest.approx(logged_eval_loss(run_dir, "warmup"), abs=1e-5)

    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("To be, or not to be: that is the question.", "  two spaces\nnew line, 12345 ünï 漢", "A"):
        assert auto.encode(text) == tokenizer.encode(text)
        assert auto.decode(auto.encode(text)) == text
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A friend.\nNo more."}]
    templated = auto.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert templated == encode_conversations(tokenizer, [conv])[0][0].tolist()

    # Our loaders read both sources alike; the generate command runs on the exported dir.
    from_hf, hf_tok = load_model(out)
    from_ckpt, ckpt_tok = load_model(ckpt)
    assert hf_tok.sha256 == ckpt_tok.sha256 == tokenizer.sha256
    assert generate(from_hf, hf_tok, "ROMEO:", 10, temperature=0) == generate(from_ckpt, ckpt_tok, "ROMEO:", 10,
                                                                                temperature=0)
    capsys.readouterr()
    assert cli(["generate", out, "--prompt", "Hi", "--chat", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert cli(["generate", out, "--prompt", "x" * 200]) == 2  # too long: an error line, not a traceback
    assert "leaves no room" in capsys.readouterr().err


def test_import_then_export_round_trips_bitwise(run_dir, tokenizer, tmp_path):
    ckpt = checkpoint.complete(run_dir)[0]
    first = export_hf(ckpt, str(tmp_path / "a"), tokenizer.path)
    cfg, state = import_hf(first)
    assert cfg == checkpoint_config(ckpt)
    plain = load_plain_weights(ckpt)
    assert state.keys() == plain.keys()
    for name in plain:
        assert state[name].dtype == torch.float32 and torch.equal(state[name], plain[name]), name
    second = save_hf(state, cfg, str(tmp_path / "b"), tokenizer.path)
    a = safetensors_torch.load_file(os.path.join(first, "model.safetensors"))
    b = safetensors_torch.load_file(os.path.join(second, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads(open(os.path.join(d, "config.json")).read()) for d in (first, second))
    ca.pop("lowrank_pt"), cb.pop("lowrank_pt")
    assert ca == cb


def test_export_merges_low_rank_adapters(run_dir, data_cache, tmp_path):
    ckpt = checkpoint.newest(run_dir)
    assert checkpoint.read_meta(ckpt)["method"] == "lora"
    raw = checkpoint.load_weights(ckpt)
    assert any("lora" in k for k in raw), "the final checkpoint should hold the LoRA stage's adapters"
    out = export_hf(run_dir, str(tmp_path / "hf"))  # a run dir: its newest checkpoint, tokenizer found
    cfg, state = import_hf(out)
    assert not any("lora" in k for k in state)
    assert not torch.equal(state["layers.0.self_attn.q_proj.weight"], raw["layers.0.self_attn.q_proj.weight"]), \
        "the trained B·A must be folded into the weights"
    model = LlamaModel(cfg)
    model.load_state_dict(state)
    model.eval()
    # The merged model computes what the adapter-wrapped model computed in training.
    assert eval_loss(model, data_cache) == pytest.approx(logged_eval_loss(run_dir, "main"), abs=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, ids), model(ids), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_export_and_import(tokenizer, tmp_path):
    from lowrank_pt.model.llama import ModelConfig, resolve

    torch.manual_seed(0)
    cfg = resolve(ModelConfig(size="tiny", seq_len=32, tie_embeddings=True, rope_theta=500.0, norm_eps=1e-5),
                  vocab_size=tokenizer.vocab_size)
    model = LlamaModel(cfg).eval()
    out = save_hf(model.state_dict(), cfg, str(tmp_path / "tied"), tokenizer.path)
    assert "lm_head.weight" not in safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, ids), model(ids), rtol=1e-5, atol=1e-5)
    back_cfg, state = import_hf(out)
    assert back_cfg == cfg
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
