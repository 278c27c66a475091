"""Sampling from a trained model with a key/value cache.

The cache path reuses the model's own modules (``embed_tokens``, each block's norms, ``q/k/v/o_proj``
and ``mlp``, ``norm``, ``lm_head``) and only re-does the attention: keys and values of past positions
are kept per layer, the prompt is run once (prefill), then one token at a time, each at its
absolute RoPE position. ``forward_cached`` of a sequence equals ``model(ids)`` to float rounding;
the tests check both the logits and the greedy tokens against full recomputation.

Contexts are limited to ``model.cfg.seq_len`` tokens (the RoPE tables, and what the model was
trained on): generation stops there with ``stop_reason="seq_len"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lowrank_pt.data import chat_template
from lowrank_pt.data.sft import encode_prompt
from lowrank_pt.model.llama import LlamaModel


@dataclass
class Generation:
    text: str
    """The generated text (the prompt and the stop token excluded)."""
    token_ids: list[int]
    """The generated ids, without the stop token."""
    stop_reason: str
    """"eos", "end" (``<|end|>``), "max_new_tokens" or "seq_len" (the context is full)."""


class KVCache:
    """Keys and values of the positions seen so far, per layer: [batch, kv heads, max_len, head_dim]."""

    def __init__(self, model: LlamaModel, batch_size: int = 1, max_len: Optional[int] = None):
        cfg = model.cfg
        self.max_len = max_len or cfg.seq_len
        weight = model.embed_tokens.weight
        shape = (batch_size, cfg.num_kv_heads, self.max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = 0


def _attention(attn, x, cos, sin, keys, values, start: int):
    b, t, _ = x.shape
    q, k, v = attn.project(x, cos, sin)
    end = start + t
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    if start == 0:  # prefill from empty: the training forward's own kernel
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.grouped)
    else:  # query i sits at position start + i and sees keys 0 .. start + i
        mask = None if t == 1 else torch.ones(t, end, dtype=torch.bool, device=x.device).tril(start)
        out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                             enable_gqa=attn.grouped)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim))


@torch.no_grad()
def forward_cached(model: LlamaModel, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [batch, t, vocab] of ``input_ids`` placed after the ``cache.length`` cached positions;
    appends their keys and values to the cache."""
    start, t = cache.length, input_ids.shape[1]
    if start + t > cache.max_len:
        raise ValueError(f"context of {start + t} tokens exceeds the cache ({cache.max_len}, model.seq_len)")
    x = model.embed_tokens(input_ids)
    cos, sin = model.rope(start + t, x.dtype)
    cos, sin = cos[start:], sin[start:]
    for i, layer in enumerate(model.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache.keys[i], cache.values[i], start)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.length = start + t
    return model.lm_head(model.norm(x))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> int:
    """One token id from a [vocab] logits vector: argmax at temperature 0, else a draw from the
    softmax of logits / temperature restricted to the top_k (0: all) and the top_p nucleus."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def stop_ids_of(tokenizer) -> dict[int, str]:
    """EOS, and ``<|end|>`` where the tokenizer has it (a tokenizer with its own chat template:
    the tokens that close a turn under it)."""
    stops = {tokenizer.eos_id: "eos"}
    if chat_template.uses_template(tokenizer):
        for t in chat_template.end_ids(tokenizer):
            stops.setdefault(t, "end")
        return stops
    try:
        stops.setdefault(tokenizer.piece_id("<|end|>"), "end")
    except ValueError:  # a DataError: a tokenizer without chat pieces
        pass
    return stops


@torch.no_grad()
def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Refuse sampling settings that mean nothing (ValueError naming each): called before any model
    is loaded by the command line, and by ``generate`` itself."""
    wrong = [f"{name}={value}: {rule}" for name, value, ok, rule in (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 0, "give >= 0"),
        ("temperature", temperature, temperature >= 0, "give >= 0 (0: greedy)"),
        ("top_k", top_k, top_k >= 0, "give >= 0 (0: every token)"),
        ("top_p", top_p, 0 < top_p <= 1, "give a share in (0, 1] (1: off)")) if not ok]
    if wrong:
        raise ValueError("; ".join(wrong))


def generate(model: LlamaModel, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True) -> Generation:
    """Continue ``prompt`` (text, or token ids) by up to ``max_new_tokens`` tokens, stopping at EOS
    or ``<|end|>``. ``temperature=0`` is greedy; the same seed gives the same draw.
    ``use_cache=False`` recomputes the whole context at every token (the reference of the tests).
    An empty prompt starts after an EOS, as a document does in pre-training."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    ids = ids or [tokenizer.eos_id]
    seq_len = model.cfg.seq_len
    if len(ids) >= seq_len:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room in model.seq_len={seq_len}")
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stops = stop_ids_of(tokenizer)
    cache = KVCache(model) if use_cache else None

    def logits_after(new: list[int]) -> torch.Tensor:
        if cache is None:
            return model(torch.tensor([ids + out], device=device))[0, -1]
        return forward_cached(model, torch.tensor([new], device=device), cache)[0, -1]

    out: list[int] = []
    reason = "max_new_tokens"
    logits = logits_after(ids)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token in stops:
            reason = stops[token]
            break
        out.append(token)
        if len(ids) + len(out) >= seq_len:
            reason = "seq_len"
            break
        logits = logits_after([token])
    return Generation(tokenizer.decode(out), out, reason)


def chat(model: LlamaModel, tokenizer, message: str, system: Optional[str] = None,
         history: Sequence[dict] = (), **sampling) -> Generation:
    """The assistant's reply to ``message`` under the SFT chat template (lowrank_pt.data.sft), after
    optional ``system`` text and earlier ``history`` turns ([{role, content}]). ``sampling``:
    generate's keyword arguments."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    messages.append({"role": "user", "content": message})
    return generate(model, tokenizer, encode_prompt(tokenizer, messages), **sampling)
