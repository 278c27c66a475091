"""Open models in: tiny random Llama (grouped-query attention, Llama 3 / linear / dynamic RoPE
scaling), Mistral and Qwen2 (q/k/v biases, tied embeddings) models built and saved by
transformers, sharded, imported: our logits equal transformers' to float rounding; what our model
cannot represent is refused by name; a GQA model exported goes back into transformers."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_pt.checkpoint.export import import_hf, save_hf
from lowrank_pt.checkpoint.hf_import import config_from_hf, stream_weights
from lowrank_pt.model.llama import LlamaModel, resolve

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)
MODELS = {
    "llama-gqa-llama3": ("LlamaConfig", dict(num_key_value_heads=2, head_dim=24, rope_theta=50000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear": ("LlamaConfig", dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-dynamic": ("LlamaConfig", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=64)),
    "qwen2-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def saved(tmp_path, name: str, **extra):
    """A random model of ``MODELS[name]`` saved by transformers in 3 shards; (dir, HF model)."""
    cls, options = MODELS[name]
    config = getattr(transformers, cls)(**{**SHAPE, **options, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: give them values that show
        for n, p in model.named_parameters():
            if n.endswith(("bias", "norm.weight")):
                p.normal_(0.5 if "norm" in n else 0.0, 0.2)
    out = tmp_path / name
    size = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(out, max_shard_size=f"{size // 3 // 1000 + 1}KB", safe_serialization=True)
    return out, model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_imported_models_give_transformers_logits(tmp_path, name):
    directory, reference = saved(tmp_path, name)
    assert len(list(directory.glob("model-*.safetensors"))) > 1  # sharded: read shard by shard
    cfg, state = import_hf(directory)
    model = LlamaModel(resolve(cfg)).eval()
    model.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert cfg.num_kv_heads == reference.config.num_key_value_heads
    if name.startswith("qwen2"):
        assert cfg.attention_bias and cfg.tie_embeddings
        assert model.lm_head.weight is model.embed_tokens.weight


def test_what_the_model_cannot_represent_is_refused_by_name(tmp_path):
    base = {**SHAPE, "model_type": "llama"}
    for extra, said in ((dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
                        (dict(mlp_bias=True), "mlp_bias"), (dict(attention_bias=True), "attention_bias"),
                        (dict(hidden_act="gelu"), "hidden_act"), (dict(model_type="gpt2"), "model_type='gpt2'")):
        with pytest.raises(ValueError, match=said):
            config_from_hf({**base, **extra})
    mistral = {**SHAPE, "model_type": "mistral", "sliding_window": 32}
    assert config_from_hf(mistral, seq_len=32).seq_len == 32  # the window never masks below it
    with pytest.raises(ValueError, match="sliding_window=32"):
        config_from_hf(mistral, seq_len=64)
    with pytest.raises(ValueError, match="lacks 'num_attention_heads'"):
        config_from_hf({"model_type": "qwen2"})


def test_a_gqa_model_exported_loads_in_transformers_with_equal_logits(tmp_path):
    directory, _ = saved(tmp_path, "llama-gqa-llama3")
    cfg, state = import_hf(directory)
    out = save_hf(state, resolve(cfg), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["rope_scaling"]["rope_type"] == "llama3"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ours = LlamaModel(resolve(cfg)).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), back(ids).logits, rtol=1e-4, atol=1e-4)
    assert dict(stream_weights(out)).keys() == state.keys()


def test_a_run_post_trains_an_imported_gqa_model_at_zero3_on_two_ranks(tmp_path, data_cache):
    """``model.size: init_from`` takes the Qwen2-shaped GQA model's config; every rank streams its
    weights from disk at ZeRO 3 (2 ranks); LoRA trains on it; the merged export loads in
    transformers with our logits."""
    from fixtures import TINY, losses, spawn

    from lowrank_pt.checkpoint.export import export_hf, load_model
    from lowrank_pt.config.recipe import load

    directory, reference = saved(tmp_path, "qwen2-tied", vocab_size=512)  # the test tokenizer's vocabulary
    run_dir = str(tmp_path / "run")
    overrides = [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "model.size=init_from", "model.seq_len=32",
                 "engine.zero_stage=3", "train.micro_batch_size=2", "train.eval_every=0", "train.log_every=1",
                 "train.tensorboard=false", "train.progress=false",
                 f"stages=[{{name: post, method: lora, steps: 4, init_from: {directory},"
                 " options: {rank: 4}, optimizer: {lr: 2.0e-2}}]"]
    cfg = load(TINY, overrides).model
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias, cfg.seq_len) == (2, 16, True, 32)
    for alive, largest, total in spawn(_train, 2, overrides):  # what each rank held of the imported weights
        assert alive <= 2 * largest and alive < total / 2, (alive, largest, total)  # a tensor at a time
    trained = losses(run_dir)
    assert len(trained) == 4 and trained[-1][1] < trained[0][1]
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the imported model before post-training
        first = reference(ids).logits
    out = export_hf(run_dir, str(tmp_path / "merged"))
    ours, _ = load_model(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), back(ids).logits, rtol=1e-4, atol=1e-4)
        assert (ours(ids) - first).abs().max() > 1e-4  # LoRA moved it


def _train(rank, world_size, overrides):
    """Train, with the import's tensors watched: the most bytes of them alive at once on this rank,
    the largest one, and the whole model's."""
    import weakref

    from fixtures import TINY

    from lowrank_pt.checkpoint import export
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    alive, seen = {}, {"peak": 0, "largest": 0, "total": 0}
    streamed = export.stream_weights

    def watched(*args, **kwargs):
        for name, tensor in streamed(*args, **kwargs):
            nbytes = tensor.numel() * tensor.element_size()
            alive[id(tensor)] = nbytes
            weakref.finalize(tensor, alive.pop, id(tensor), None)
            seen.update(peak=max(seen["peak"], sum(alive.values())), largest=max(seen["largest"], nbytes),
                        total=seen["total"] + nbytes)
            yield name, tensor

    export.stream_weights = watched
    try:
        Trainer(load(TINY, overrides)).run_all()
    finally:
        export.stream_weights = streamed
    return seen["peak"], seen["largest"], seen["total"]
