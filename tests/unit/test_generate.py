"""Generation: the KV-cache path equals full recomputation (logits and tokens), sampling is
seeded and restricted as asked, and generation stops at EOS, <|end|> and the context length."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_pt.data import DataConfig, Tokenizer, prepare_data
from lowrank_pt.data.sft import encode_prompt
from lowrank_pt.eval.generate import KVCache, chat, forward_cached, generate, sample_next
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token steps of a tiny model are latency-bound: a second thread only adds sync cost
    (15x slower on a shared, loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(data_cache):
    return Tokenizer(prepare_data(DataConfig(source="embedded", vocab_size=512, max_documents=200,
                                             cache_dir=data_cache), progress=False).tokenizer_path)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=64), vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():  # larger weights than the init's: peaked, input-dependent predictions
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return m


def test_cached_logits_equal_full_forward(model):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    cache = KVCache(model, batch_size=2)
    chunks = [forward_cached(model, ids[:, :20], cache), forward_cached(model, ids[:, 20:27], cache)]
    chunks += [forward_cached(model, ids[:, t:t + 1], cache) for t in range(27, 64)]
    assert cache.length == 64
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the cache"):
        forward_cached(model, ids[:, :1], cache)


def test_greedy_with_cache_equals_recomputation(model, tokenizer):
    for prompt in ("To be, or not to be", "ROMEO:\nBut soft"):
        cached = generate(model, tokenizer, prompt, max_new_tokens=200, temperature=0)
        full = generate(model, tokenizer, prompt, max_new_tokens=200, temperature=0, use_cache=False)
        assert cached.token_ids == full.token_ids and cached.stop_reason == full.stop_reason
        assert cached.text == tokenizer.decode(cached.token_ids)
        if cached.stop_reason == "seq_len":
            assert len(tokenizer.encode(prompt)) + len(cached.token_ids) == model.cfg.seq_len
    assert len(set(generate(model, tokenizer, "To be", 20, temperature=0).token_ids)) > 1


def test_sampling_is_seeded_and_equal_with_and_without_cache(model, tokenizer):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=40, top_p=0.95)
    a = generate(model, tokenizer, "Now is the winter", seed=3, **kw)
    assert generate(model, tokenizer, "Now is the winter", seed=3, **kw) == a
    assert generate(model, tokenizer, "Now is the winter", seed=3, use_cache=False, **kw).token_ids == a.token_ids
    assert generate(model, tokenizer, "Now is the winter", seed=4, **kw).token_ids != a.token_ids
    top1 = generate(model, tokenizer, "Now is the winter", 30, temperature=1.0, top_k=1, seed=5)
    assert top1.token_ids == generate(model, tokenizer, "Now is the winter", 30, temperature=0).token_ids


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample_next(logits, 1.0, generator=g, **kw) for _ in range(300)}  # noqa: E731
    assert draws(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert draws(top_k=2, top_p=1.0) == {0, 1}
    assert draws(top_k=0, top_p=0.6) == {0, 1}  # 0.5 alone is short of 0.6
    assert draws(top_k=0, top_p=0.5) == {0}
    assert sample_next(logits, 0.0, 0, 1.0, None) == 0


def _biased_head(model, token_id: int) -> nn.Linear:
    head = nn.Linear(model.cfg.hidden_size, model.cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    return head


def test_stops_at_end_eos_and_limits(tokenizer):
    torch.manual_seed(0)
    m = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=32), vocab_size=tokenizer.vocab_size)).eval()
    a = tokenizer.encode("a")[0]
    m.lm_head = _biased_head(m, tokenizer.piece_id("<|end|>"))
    assert generate(m, tokenizer, "Hi", 10, temperature=0).stop_reason == "end"
    m.lm_head = _biased_head(m, tokenizer.eos_id)
    result = generate(m, tokenizer, "Hi", 10, temperature=0)
    assert (result.stop_reason, result.token_ids, result.text) == ("eos", [], "")
    m.lm_head = _biased_head(m, a)
    assert generate(m, tokenizer, "Hi", 5, temperature=0).token_ids == [a] * 5
    prompt = tokenizer.encode("Hi")
    full = generate(m, tokenizer, prompt, 100, temperature=0)
    assert full.stop_reason == "seq_len" and len(prompt) + len(full.token_ids) == 32
    with pytest.raises(ValueError, match="no room"):
        generate(m, tokenizer, [a] * 32, 5)


def test_chat_applies_the_sft_template(model, tokenizer):
    history = [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": "Good morrow."}]
    reply = chat(model, tokenizer, "Who art thou?", system="Speak in verse.", history=history,
                 max_new_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "Speak in verse."}, *history,
                {"role": "user", "content": "Who art thou?"}]
    same = generate(model, tokenizer, encode_prompt(tokenizer, messages), 12, temperature=0)
    assert reply == same
