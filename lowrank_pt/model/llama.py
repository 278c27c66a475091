"""A LLaMA-style decoder in plain torch: RMSNorm, RoPE, SwiGLU, scaled_dot_product_attention.

Module names follow the Hugging Face Llama layout (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm`` ...) so export is a renaming of the prefix only, and
low-rank methods target modules by the names users know from the papers' code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowrank_pt.zero.params import gathered


@dataclass
class ModelConfig:
    size: str = "tiny"
    """Named size: one of MODEL_SIZES (tiny, small, demo, 60m, 130m, 350m, 1b, 7b); the fields
    below left at null take the size's values. ``init_from``: the model of the first stage's
    init_from weights (a Hugging Face Llama, Mistral or Qwen2 dir, or a run's checkpoint): every
    shape, RoPE and norm field is theirs; seq_len and activation_checkpointing stay these."""
    hidden_size: Optional[int] = None
    """Width of the residual stream."""
    intermediate_size: Optional[int] = None
    """Width of the SwiGLU MLP."""
    num_layers: Optional[int] = None
    """Number of decoder blocks."""
    num_heads: Optional[int] = None
    """Attention (query) heads; hidden_size must divide by it unless head_dim is set."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention: each serves num_heads / num_kv_heads query heads,
    as Llama 3, Mistral and Qwen2 do); null: num_heads (multi-head attention)."""
    head_dim: Optional[int] = None
    """Width of one head; null: hidden_size / num_heads (set where a model's differs)."""
    attention_bias: bool = False
    """Biases on the query, key and value projections (Qwen2's); the output projection has none."""
    vocab_size: Optional[int] = None
    """Vocabulary size; null takes it from the tokenizer (the usual case)."""
    seq_len: int = 256
    """Training sequence length (tokens per sample) and RoPE table length."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Optional[str] = None
    """RoPE frequency scaling as Hugging Face defines it: null (none), llama3 (Llama 3.1's
    piecewise scaling by rope_factor between the low and high frequency factors), linear
    (positions divided by rope_factor) or dynamic (NTK: the base raised for seq_len past
    rope_original_max_positions, computed once for seq_len)."""
    rope_factor: float = 1.0
    """The scaling's factor (rope_scaling's ``factor``)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths longer than rope_original_max_positions / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than rope_original_max_positions / this are kept."""
    rope_original_max_positions: Optional[int] = None
    """llama3 and dynamic: the context the model was pre-trained with (original_max_position_embeddings)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (the papers' models do not)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""


# The papers' LLaMA sizes (GaLore Table 5; 250m: ReLoRA's repository config; 32000-token vocabulary), plus small
# sizes that train in minutes on a CPU.
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4),
    "small": dict(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4),
    "demo": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12),
    "250m": dict(hidden_size=768, intermediate_size=2560, num_layers=24, num_heads=16),  # ReLoRA's repo
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_layers=24, num_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_layers=24, num_heads=32),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
}


def resolve(cfg: ModelConfig, vocab_size: Optional[int] = None) -> ModelConfig:
    """Fill the null fields from the named size and the tokenizer's vocabulary."""
    if cfg.size not in MODEL_SIZES:
        raise ValueError(f"model.size={cfg.size!r}: allowed {sorted(MODEL_SIZES)}")
    filled = {k: v for k, v in MODEL_SIZES[cfg.size].items() if getattr(cfg, k) is None}
    out = replace(cfg, **filled)
    if out.vocab_size is None:
        out = replace(out, vocab_size=vocab_size if vocab_size is not None else 32000)
    if out.head_dim is None:
        if out.hidden_size % out.num_heads:
            raise ValueError(f"model.hidden_size={out.hidden_size} must divide into num_heads={out.num_heads} heads "
                             "(or set model.head_dim)")
        out = replace(out, head_dim=out.hidden_size // out.num_heads)
    if out.head_dim % 2:
        raise ValueError(f"model.head_dim={out.head_dim} must be even (RoPE rotates pairs)")
    if out.num_kv_heads is None:
        out = replace(out, num_kv_heads=out.num_heads)
    if out.num_kv_heads < 1 or out.num_heads % out.num_kv_heads:
        raise ValueError(f"model.num_heads={out.num_heads} must be a multiple of num_kv_heads={out.num_kv_heads}")
    if out.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling={out.rope_scaling!r}: allowed {list(ROPE_SCALINGS)}")
    if out.rope_scaling in ("llama3", "dynamic") and out.rope_original_max_positions is None:
        raise ValueError(f"model.rope_scaling={out.rope_scaling} needs model.rope_original_max_positions")
    return out


ROPE_SCALINGS = (None, "llama3", "linear", "dynamic")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32: bf16 mean-of-squares loses too much for deep stacks.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def inv_frequencies(cfg: "ModelConfig") -> torch.Tensor:
    """RoPE's inverse frequencies (float64) of a resolved config, with its scaling (the arithmetic of
    transformers' ``rope_init_fn`` for each type; dynamic for a sequence of seq_len tokens)."""
    dim, theta = cfg.head_dim, cfg.rope_theta
    if cfg.rope_scaling == "dynamic" and cfg.seq_len > cfg.rope_original_max_positions:
        f, orig = cfg.rope_factor, cfg.rope_original_max_positions
        theta = theta * ((f * cfg.seq_len / orig) - (f - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float64) / dim)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        orig, f = cfg.rope_original_max_positions, cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / f, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: "ModelConfig") -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = inv_frequencies(cfg)
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, q_width, kv_width = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv_width, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv_width, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_width, d, bias=False)

    @property
    def grouped(self) -> bool:
        """Whether key/value heads serve several query heads (scaled_dot_product_attention's enable_gqa)."""
        return self.num_kv_heads != self.num_heads

    def project(self, x, cos, sin):
        """Queries [batch, heads, t, head_dim] and keys and values [batch, kv heads, t, head_dim],
        RoPE applied (shared with the KV-cache path of lowrank_pt.eval.generate)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.grouped)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Decoder-only LM. ``forward(input_ids, labels)`` returns the mean next-token loss
    (labels of -100 are ignored);
    ``forward(input_ids)`` returns logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_layers is None or cfg.vocab_size is None:
            raise ValueError("LlamaModel needs a resolved ModelConfig (see model.resolve)")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        # Output projections scaled by depth, as in GPT-2/LLaMA practice, keep the residual
        # stream's variance flat at init.
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            with gathered([p], modifier_rank=0):
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:  # drawn in fp32 whatever p's dtype: the same values as an fp32 build cast later
                    scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.empty(p.shape, dtype=torch.float32, device=p.device).normal_(0.0, scale))

    def rope(self, length: int, dtype):
        if length > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {length} tokens is longer than model.seq_len={self.cfg.seq_len}")
        device = self.embed_tokens.weight.device
        return self.rope_cos[:length].to(device, dtype), self.rope_sin[:length].to(device, dtype)

    def forward(self, input_ids, labels=None):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(input_ids.shape[1], x.dtype)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of a resolved config, from the shapes alone (no allocation)."""
    d, f, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d + ((q + 2 * kv) if cfg.attention_bias else 0)
    embeddings = v * d * (1 if cfg.tie_embeddings else 2)
    return L * per_layer + embeddings + d


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "attention_bias", "vocab_size", "tie_embeddings")
"""The model fields a checkpoint's weights depend on (a resume or init_from must match them)."""


def shape_difference(saved: ModelConfig | dict, ours: ModelConfig, there: str = "there") -> str | None:
    """The first shape field that differs, as ``model.KEY is A here but B <there>``; None if none."""
    saved = dict(saved) if isinstance(saved, dict) else asdict(saved)
    if saved.get("hidden_size") and saved.get("num_heads"):  # recorded before these fields existed
        saved.setdefault("num_kv_heads", saved["num_heads"])
        saved.setdefault("head_dim", saved["hidden_size"] // saved["num_heads"])
        saved.setdefault("attention_bias", False)
    for key in SHAPE_KEYS:
        if saved.get(key) != getattr(ours, key):
            return f"model.{key} is {getattr(ours, key)} here but {saved.get(key)} {there}"
    return None


def flops_per_token(cfg) -> int:
    """Training FLOPs per token of a resolved ``ModelConfig``, forward + backward, the PaLM /
    torchtitan convention: ``6·N_matmul + 12·L·d·T``.

    - ``N_matmul``: weights that multiply activations: every linear of the blocks plus the output
      head. The input embedding is a lookup, not a matmul, so it is left out (the head's matmul is
      counted, tied to the embedding or not). Norm weights are elementwise and negligible.
      Each such weight costs 2 FLOPs per token forward (multiply-add) and 4 backward (input grad
      and weight grad): 6·N.
    - ``12·L·d·T``: attention scores ``Q·Kᵀ`` and ``softmax·V`` are 2·2·T·d per token per layer
      forward, twice that backward. The causal mask is not subtracted (kernels that skip the
      masked half are counted as if they did not): the usual convention, which makes numbers
      comparable with published MFU.

    The count is the *plain model's*, whatever method trains it: LoRA and GaLore skip part of the
    weight-gradient work (and add the factors' small products), but MFU measures useful model work
    per second, so a cheaper method shows up as more tokens/s at the same FLOPs per token, not as a
    smaller count.
    """
    d, f, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q = cfg.num_heads * (cfg.head_dim or d // cfg.num_heads)
    kv = (cfg.num_kv_heads or cfg.num_heads) * (cfg.head_dim or d // cfg.num_heads)
    n_matmul = L * (2 * d * q + 2 * d * kv + 3 * d * f) + v * d  # block linears + output head
    return 6 * n_matmul + attention_flops_per_token(cfg)


def attention_flops_per_token(cfg) -> int:
    """``12·L·q·T``: the attention products ``Q·Kᵀ`` and ``softmax·V`` of a resolved config, forward
    and backward, per token (see ``flops_per_token``)."""
    q = cfg.num_heads * (cfg.head_dim or cfg.hidden_size // cfg.num_heads)
    return 12 * cfg.num_layers * q * cfg.seq_len
