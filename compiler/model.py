"""Llama 3.1 in plain torch: the one model definition that is exported, verified and served.

The forward takes a flat batch of tokens (any mix of prefill chunks and decode tokens) and explicit
metadata tensors, and the paged KV cache as an input that it updates in place. It holds no Python
state between calls, so one exported program serves every batch the runtime schedules.

Parameter names are Hugging Face's, so a checkpoint loads without a rename table and the passes'
new weights (`qkv_proj`, `gate_up_proj`) read as what they are. A pre-quantized checkpoint's FP8
weights keep their compressed-tensors names too (`q_proj.weight`, `q_proj.weight_scale`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import llama_aot.kernels.ops  # noqa: F401  (registers torch.ops.llama_aot)
from llama_aot.artifacts.config import ModelConfig
from llama_aot.kernels.fp8_linear import FP8, WEIGHT_ONLY

ops = torch.ops.llama_aot


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: statistics in float32, cast back before the weight multiply."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Fp8Linear(nn.Module):
    """A bias-free linear whose weight came from the checkpoint in FP8: float8_e4m3fn [N, K] with
    one float32 scale per output row. It is used as stored, never dequantized and requantized, so
    export emits the same fp8_linear op that `--fp8` quantization does. The quantize pass then
    picks each matmul's mode; weight-only is the placeholder."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, WEIGHT_ONLY)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama 3.1's wavelength-dependent scaling when configured.

    Built on the CPU in float32 whatever device the model is constructed on: it is computed, never
    loaded, so it must not be a meta tensor."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for each position, in HF's layout (each frequency twice, halves concatenated)."""
    return ops.rotary_tables(positions, inv_freq, dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, input_size: int | None = None):
        """`input_size`: what q, k and v project from, the hidden size unless given (an EAGLE-3
        head's layer reads twice that, compiler/eagle_head.py)."""
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        input_size = input_size or cfg.hidden_size
        self.q_proj = nn.Linear(input_size, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(input_size, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(input_size, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, batch: "BatchInputs", kv_cache: torch.Tensor) -> torch.Tensor:
        """RoPE on q and k and the cache write are one op (kernels/kv_cache.py): it returns the
        rotated q, and attention then reads this step's keys from the cache."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q = ops.rope_write_kv(q, k, v, cos, sin, kv_cache, self.layer, batch.slots)
        o = ops.paged_attention(q, kv_cache, self.layer, batch.block_tables, batch.context_lens,
                                batch.query_index, batch.positions, self.head_dim ** -0.5)
        return self.o_proj(o.view(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, batch: "BatchInputs", kv_cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class BatchInputs:
    """The metadata tensors of one step, named; see kernels/paged_attention.py for their meaning."""

    def __init__(self, positions, slots, block_tables, context_lens, query_index):
        self.positions, self.slots, self.block_tables = positions, slots, block_tables
        self.context_lens, self.query_index = context_lens, query_index


class Llama(nn.Module):
    """`forward(tokens, positions, slots, block_tables, context_lens, query_index, logits_index,
    kv_cache) -> logits[len(logits_index), vocab]` in float32.

    Only the rows in `logits_index` reach the LM head: a prefill chunk needs logits for its last
    token alone, and the vocabulary projection is the largest matmul in the model.

    With `eagle_taps` (an EAGLE-3 head's three layers, compiler/eagle_head.py) it also returns the
    head's input for every token, `eagle_fc` of the residual stream entering those layers, so that
    the draft program reads an H-wide hidden state whether the target or the draft made it."""

    def __init__(self, cfg: ModelConfig, eagle_taps: tuple[int, ...] = ()):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)
        self.eagle_taps = tuple(eagle_taps)
        if self.eagle_taps:
            self.eagle_fc = nn.Linear(len(self.eagle_taps) * cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, tokens, positions, slots, block_tables, context_lens, query_index, logits_index,
                kv_cache):
        batch = BatchInputs(positions, slots, block_tables, context_lens, query_index)
        x = self.model.embed_tokens(tokens)
        cos, sin = rotary(positions, self.rope_inv_freq, x.dtype)
        taps = []
        for i, layer in enumerate(self.model.layers):
            taps += [x] * self.eagle_taps.count(i)
            x = layer(x, cos, sin, batch, kv_cache)
        logits = self.lm_head(self.model.norm(x)[logits_index]).float()
        if not self.eagle_taps:
            return logits
        return logits, self.eagle_fc(torch.cat(taps, dim=-1))


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], eagle_taps: tuple[int, ...] = ()) -> Llama:
    """Constructs on the meta device and adopts `weights` as the parameters (no copy, no random
    init), tying the LM head to the embedding when the config says so. A linear whose weight is
    FP8 becomes an Fp8Linear. With `eagle_taps`, `weights` holds the head's `eagle_fc.weight`."""
    weights = dict(weights)
    if cfg.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Llama(cfg, eagle_taps)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and weights[f"{name}.weight"].dtype == FP8:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Fp8Linear(module.in_features, module.out_features))
    model.rope_inv_freq = rope_inv_freq(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
