"""The LLaMA model: the papers' sizes, agreement with transformers' Llama, caches, checkpointing."""

import pytest
import torch

from lowrank_pt.model.llama import MODEL_SIZES, LlamaModel, ModelConfig, count_parameters, resolve

PAPER_SIZES = ["60m", "130m", "350m", "1b", "7b"]


def hf_llama(cfg: ModelConfig):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    return transformers.LlamaForCausalLM(hf_cfg)


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_sizes_match_the_reference_architecture(size):
    cfg = resolve(ModelConfig(size=size))
    with torch.device("meta"):
        ours = sum(p.numel() for p in LlamaModel(cfg).parameters())
        theirs = sum(p.numel() for p in hf_llama(cfg).parameters())
    assert ours == count_parameters(cfg) == theirs


def test_logits_match_transformers_llama():
    cfg = resolve(ModelConfig(size="tiny", seq_len=32), vocab_size=96)
    torch.manual_seed(0)
    ours = LlamaModel(cfg).eval()
    theirs = hf_llama(cfg).eval()
    missing = theirs.load_state_dict(
        {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.state_dict().items()},
        strict=False)
    assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys)
    ids = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=2e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64)
    torch.manual_seed(0)
    plain = LlamaModel(cfg)
    ckpt = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16, activation_checkpointing=True), vocab_size=64))
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (2, 17))
    for m in (plain, ckpt):
        m(ids[:, :-1], ids[:, 1:]).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_named_sizes_resolve_and_reject_unknown():
    for size in MODEL_SIZES:
        assert resolve(ModelConfig(size=size)).num_layers == MODEL_SIZES[size]["num_layers"]
    with pytest.raises(ValueError, match="model.size"):
        resolve(ModelConfig(size="huge"))


def test_grouped_query_attention_shapes_counts_and_flops():
    """num_kv_heads, head_dim and q/k/v biases reach the projections, the parameter count, the
    FLOPs and the KV cache; a bad combination is refused."""
    from lowrank_pt.eval.generate import KVCache
    from lowrank_pt.model.llama import flops_per_token

    cfg = resolve(ModelConfig(size="tiny", num_kv_heads=1, head_dim=8, attention_bias=True), vocab_size=50)
    model = LlamaModel(cfg)
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (8, 64)
    assert attn.o_proj.weight.shape == (64, 32) and attn.k_proj.bias.shape == (8,) and attn.o_proj.bias is None
    assert float(attn.q_proj.bias.abs().max()) == 0.0  # biases start at zero
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    mha = resolve(ModelConfig(size="tiny"), vocab_size=50)
    assert flops_per_token(cfg) < flops_per_token(mha)
    assert KVCache(model).keys[0].shape == (1, 1, cfg.seq_len, 8)
    for bad, said in ((dict(num_kv_heads=3), "multiple of num_kv_heads=3"), (dict(head_dim=7), "even"),
                      (dict(rope_scaling="llama3"), "rope_original_max_positions"),
                      (dict(rope_scaling="yarn"), "rope_scaling")):
        with pytest.raises(ValueError, match=said):
            resolve(ModelConfig(size="tiny", **bad), vocab_size=50)


def test_a_model_recorded_before_gqa_existed_still_matches_its_shape():
    """meta.json of a checkpoint saved before num_kv_heads, head_dim and attention_bias existed."""
    from dataclasses import asdict

    from lowrank_pt.model.llama import shape_difference

    cfg = resolve(ModelConfig(size="tiny"), vocab_size=50)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("num_kv_heads", "head_dim", "attention_bias")}
    assert shape_difference(old, cfg) is None
    assert "num_kv_heads" in shape_difference(old, resolve(ModelConfig(size="tiny", num_kv_heads=2), vocab_size=50))
