"""The two configs a build is made of: what the model is, and how it is built.

Both are frozen dataclasses validated on construction, so a bad value fails where it enters (a
config.json, a CLI flag, a manifest) instead of deep inside export. `from_dict` rejects unknown keys:
a manifest written by a newer format must not be half-understood.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from llama_aot.artifacts.errors import ConfigError

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_QUANTS = ("none", "fp8", "int8")
SPECULATIVE_ALGORITHMS = ("EAGLE3",)  # SGLang's --speculative-algorithm names
MAX_SPECULATIVE_STEPS = 8  # tokens drafted per step, at build (--speculative-num-steps) and serve time
# `--kv-cache-dtype`, by SGLang's and vLLM's names: "auto" stores the cache in the model dtype.
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
FP8_KV = "fp8_e4m3"
# The passes a build config switches on by itself, and when.
WHEN_PASS_RUNS = {"quantize_fp8": "the weights are fp8", "quantize_int8": "the weights are int8", "quantize_kv_cache": f"the KV cache is {FP8_KV}",
                  "shard_tensor_parallel": "--tp is above 1"}
TARGETS = ("cpu", "cuda")


def _from_dict(cls, data: dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown keys {unknown}; this build of llama-aot knows {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's 'llama3' frequency scaling: long wavelengths are slowed by `factor`, short ones
    are kept, and the band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling: invalid llama3 factors {self}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling: original_max_position_embeddings must be positive")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads ({self.num_heads}) is not a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("model config: rms_norm_eps and rope_theta must be positive")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _from_dict(RopeScaling, self.rope_scaling, "rope_scaling"))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "model config")


@dataclass(frozen=True)
class TargetDefaults:
    """What a build for a target gets where neither a flag nor the caller says otherwise. One
    table, so that `llama-compile` and a BuildConfig made in Python build the same artifact."""

    dtype: str
    max_num_tokens: int  # per step
    max_num_seqs: int  # per step; capped at max_num_tokens
    passes: tuple[str, ...]  # by name; passes/pipeline.py orders them


_FUSIONS = ("fuse_qkv", "fuse_gate_up", "fuse_add_rmsnorm")
TARGET_DEFAULTS = {
    "cpu": TargetDefaults("float32", 512, 64, _FUSIONS),
    # Step sizes a GPU serves best with: 2048-token steps cut the median TTFT of 8000-token prompts
    # at c=64 several times over against 512, at some cost to the decode steps a chunk shares, which
    # `llama-serve --chunked-prefill-size` trades back per server (docs/serving.md, "Step size: 2048
    # vs 512 tokens per step"). 128 sequences fit the sweep's c=100. route_decode_linears picks a
    # CUDA kernel for small steps; on CPU its two branches would be the same matmul.
    "cuda": TargetDefaults("bfloat16", 2048, 128, _FUSIONS + ("route_decode_linears",)),
}


@dataclass(frozen=True)
class BuildConfig:
    """How one artifact is built. A field left None (dtype, step sizes, passes) takes the target's
    TARGET_DEFAULTS on construction, and the passes WHEN_PASS_RUNS names are added to the defaults
    when the config asks for them (FP8, an FP8 KV cache, --tp above 1)."""

    target: str = "cpu"
    dtype: str | None = None
    weight_quant: str = "none"
    fp8_lm_head: bool = False
    # Decoder matmuls --fp8 leaves in the model dtype: a weight whose name contains one of these
    # (post-fusion names: qkv_proj, o_proj, gate_up_proj, down_proj; "layers.29." for a layer), or
    # matches "re:<regex>", as compressed-tensors' `ignore` lists read.
    fp8_ignore: tuple[str, ...] = ()
    kv_dtype: str = "auto"
    tp: int = 1
    max_num_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int = 16
    context_length: int = 0
    max_autotune: bool = False
    passes: tuple[str, ...] | None = None
    # EAGLE: the draft head is its own program in the artifact (compiler/eagle_head.py); the
    # target program also returns the head's input. `speculative_num_steps`: tokens drafted per step.
    speculative_algorithm: str | None = None
    speculative_num_steps: int = 3

    def _check_int8(self) -> None:
        """--int8 is torch's int8 weight-only CPU matmul, fast with bfloat16 activations only
        (passes/quantize_int8.py), so it computes in bfloat16 unless --dtype says float16."""
        if self.target != "cpu":
            raise ConfigError(f"--int8: the CPU target's weight quantization (torch's int8 weight-only matmul); "
                              f"for --target {self.target} use --fp8")
        if self.tp != 1:
            raise ConfigError(f"--int8 --tp {self.tp}: the tensor-parallel shard pass does not cut int8 matmuls yet; "
                              "build --int8 on one rank")
        if self.dtype is None:
            object.__setattr__(self, "dtype", "bfloat16")
        elif self.dtype == "float32":
            raise ConfigError("--int8 --dtype float32: torch's int8 matmul with float32 activations runs slower than "
                              "float32 weights here; leave --dtype out (bfloat16) or build without --int8")

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target}: unknown target; choose one of {', '.join(TARGETS)}")
        defaults = TARGET_DEFAULTS[self.target]
        if self.weight_quant not in WEIGHT_QUANTS:
            raise ConfigError(f"weight quantization {self.weight_quant!r} is unknown; choose one of "
                              f"{', '.join(WEIGHT_QUANTS)}")
        if self.kv_dtype not in SUPPORTED_DTYPES + KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype {self.kv_dtype}: unsupported; choose one of {', '.join(KV_CACHE_DTYPES)}")
        switched = {"quantize_fp8": self.weight_quant == "fp8", "quantize_int8": self.weight_quant == "int8",
                    "quantize_kv_cache": self.kv_dtype == FP8_KV,
                    "shard_tensor_parallel": isinstance(self.tp, int) and self.tp > 1}
        if self.passes is None:
            object.__setattr__(self, "passes", defaults.passes + tuple(name for name, on in switched.items() if on))
        for name, on in switched.items():
            if (name in self.passes) != on:
                raise ConfigError(f"passes {list(self.passes)} and the build config disagree: the {name} pass runs "
                                  f"exactly when {WHEN_PASS_RUNS[name]}")
        if self.weight_quant == "int8":
            self._check_int8()
        for name in ("dtype", "max_num_tokens"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(defaults, name))
        if self.max_num_seqs is None:
            object.__setattr__(self, "max_num_seqs", min(defaults.max_num_seqs, self.max_num_tokens))
        object.__setattr__(self, "passes", tuple(self.passes))
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: unsupported; choose one of {', '.join(SUPPORTED_DTYPES)}")
        if self.fp8_lm_head and self.weight_quant != "fp8":
            raise ConfigError("--fp8-lm-head quantizes the LM head along with the other weights; it needs --fp8")
        object.__setattr__(self, "fp8_ignore", tuple(self.fp8_ignore))
        if self.fp8_ignore and self.weight_quant != "fp8":
            raise ConfigError("--fp8-ignore names matmuls --fp8 leaves unquantized; it needs --fp8")
        for pattern in self.fp8_ignore:
            if not pattern or pattern == "re:":
                raise ConfigError("--fp8-ignore: an empty pattern would keep every matmul; name a module")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"--fp8-ignore {pattern}: not a regular expression ({e})") from None
        if self.kv_dtype == "auto":
            object.__setattr__(self, "kv_dtype", self.dtype)
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ConfigError(f"--tp {self.tp}: must be a positive integer")
        if self.max_num_tokens < 8:
            raise ConfigError(f"--max-num-tokens {self.max_num_tokens}: must be at least 8")
        if not 2 <= self.max_num_seqs <= self.max_num_tokens:
            raise ConfigError(f"--max-num-seqs {self.max_num_seqs}: must be between 2 and --max-num-tokens "
                             f"({self.max_num_tokens}), since every sequence in a step brings a token")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block size {self.block_size}: must be a power of two")
        if self.max_autotune and self.target != "cuda":
            raise ConfigError("--max-autotune tunes GPU kernels; it needs --target cuda")
        if self.context_length < 0:
            raise ConfigError(f"--context-length {self.context_length}: must be positive")
        if self.speculative_algorithm is not None:
            if self.speculative_algorithm not in SPECULATIVE_ALGORITHMS:
                raise ConfigError(f"--speculative-algorithm {self.speculative_algorithm}: unsupported; choose one of "
                                  f"{', '.join(SPECULATIVE_ALGORITHMS)}")
            if self.tp > 1:
                raise ConfigError("--speculative-algorithm with --tp above 1 is not built yet; build one of them")
            if not isinstance(self.speculative_num_steps, int) or \
                    not 1 <= self.speculative_num_steps <= MAX_SPECULATIVE_STEPS:
                raise ConfigError(f"--speculative-num-steps {self.speculative_num_steps}: must be between 1 and "
                                  f"{MAX_SPECULATIVE_STEPS}")

    def resolved(self, model: ModelConfig) -> "BuildConfig":
        """Fill the context length from the model when the user gave none, and refuse one the
        model's positions cannot reach, or a --tp that does not divide its heads and MLP."""
        counts = {"attention heads": model.num_heads, "key/value heads": model.num_kv_heads,
                  "MLP intermediate size": model.intermediate_size}
        undivided = [f"{n} {what}" for what, n in counts.items() if n % self.tp]
        if undivided:
            raise ConfigError(f"--tp {self.tp} does not divide the model's {' and '.join(undivided)}; choose a --tp "
                              f"that divides {', '.join(map(str, counts.values()))}")
        ctx = self.context_length or model.max_position_embeddings
        if ctx < 4 * self.block_size:
            raise ConfigError(f"--context-length {ctx}: must be at least 4 blocks ({4 * self.block_size} tokens)")
        if ctx > model.max_position_embeddings:
            raise ConfigError(f"--context-length {ctx} exceeds the model's max_position_embeddings "
                             f"({model.max_position_embeddings})")
        return dataclasses.replace(self, context_length=ctx)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.context_length // self.block_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes"], d["fp8_ignore"] = list(self.passes), list(self.fp8_ignore)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        return _from_dict(cls, data, "build config")


def torch_dtype(name: str):
    """The torch dtype of a config's dtype name, FP8_KV included."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            FP8_KV: torch.float8_e4m3fn}[name]


__all__ = ["ModelConfig", "BuildConfig", "RopeScaling", "TARGET_DEFAULTS", "torch_dtype"]
