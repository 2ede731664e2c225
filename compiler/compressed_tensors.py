"""Pre-quantized checkpoints in compressed-tensors' FP8 format, the one RedHatAI and neuralmagic
publish (Meta-Llama-3.1-8B-Instruct-FP8, -FP8-dynamic) and vLLM serves.

Such a checkpoint stores each quantized Linear's weight as float8_e4m3fn next to its
`weight_scale`: per output channel ([N, 1]) or per tensor ([1] or []). config.json's
`quantization_config` says which layers are quantized and how. compressed-tensors' own pydantic
models parse it and its own matcher applies `targets` and `ignore`, so the format is not
re-derived here. Only what fp8_linear computes exactly is accepted: symmetric FP8 weights with
per-channel or per-tensor scales. Anything else, such as int4 or int8 weights, group or block
scales, or zero points, is refused in one line that names it, before any weight is read.

The weights are taken as stored and never dequantized and requantized, which would re-round a
per-tensor checkpoint. A per-tensor scale becomes float32 [N] with every row equal, the form
fp8_linear takes; the result is exactly the same.

Static `input_scale`s (the "-FP8" checkpoints) are ignored. The build quantizes activations
dynamically per token or not at all (kernels/fp8_linear.py), which is at least as accurate as one
scale calibrated for all inputs. When `kv_cache_scheme` is set, the per-layer `self_attn.k_scale`
and `v_scale` are read for the FP8 KV cache (checkpoint.load_kv_scales).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_aot.compiler.errors import BuildError

QUANT_METHOD = "compressed-tensors"
FORMATS = ("float-quantized", "naive-quantized")
STRATEGIES = ("channel", "tensor")
FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
SCALE_DTYPES = ("F32", "BF16", "F16")
KV_SCALES = ("k_scale", "v_scale")
_LINEAR_WEIGHTS = ("_proj.weight", "lm_head.weight")
SUPPORTED = "llama-aot loads FP8 (float8_e4m3fn) weights with per-channel or per-tensor scales"


@dataclass(frozen=True)
class Quantization:
    """What config.json's quantization_config says about the tensors. `weights` maps each FP8
    weight's HF name to its scale strategy ("channel" or "tensor"). `kv_cache_scales` says whether
    every layer has a K and a V cache scale."""

    weights: dict[str, str]
    kv_cache_scales: bool

    def scale_shapes(self, shapes: dict[str, tuple[int, ...]], num_layers: int) -> dict[str, tuple]:
        """The scale tensors the checkpoint must hold, each with the shapes it may have, the
        format's own first."""
        out: dict[str, tuple] = {}
        for weight, strategy in self.weights.items():
            rows = shapes[weight][0]
            out[weight_scale_name(weight)] = ((rows, 1), (rows,)) if strategy == "channel" else ((1,), ())
        if self.kv_cache_scales:
            out.update({name: ((1,), ()) for name in kv_scale_names(num_layers)})
        return out

    def check_dtypes(self, tensors: dict, scales: dict[str, tuple]) -> None:
        """Checks that each FP8 weight is stored as FP8, and each scale in `scales`
        (`scale_shapes`) has one of its shapes and a float dtype. `tensors` is the checkpoint's
        TensorInfo by name, with every name present."""
        for name in self.weights:
            info = tensors[name]
            if info.dtype != FP8_DTYPE:
                raise BuildError(f"{name} in {info.file.name} is stored as {info.dtype} but config.json's "
                                 f"quantization_config quantizes it to {FP8_DTYPE}; the weights and "
                                 "config.json do not match")
        for name, allowed in scales.items():
            info = tensors[name]
            if info.shape not in allowed or info.dtype not in SCALE_DTYPES:
                raise BuildError(f"{name} in {info.file.name} is {info.dtype} of shape {list(info.shape)} but "
                                 f"config.json's quantization_config implies shape {list(allowed[0])} in "
                                 f"{'/'.join(SCALE_DTYPES)}; the weights and config.json do not match")

    def ignored(self) -> set[str]:
        """The static input scales, which the build does not use (see the module docstring)."""
        return {weight.removesuffix("weight") + "input_scale" for weight in self.weights}


def weight_scale_name(weight: str) -> str:
    """The format's name for a weight's scale, `<module>.weight_scale`; the passes name the scales
    they make the same way (passes/program.py)."""
    return weight.removesuffix("weight") + "weight_scale"


def kv_scale_names(num_layers: int) -> list[str]:
    """`model.layers.{i}.self_attn.{k,v}_scale`, layer by layer, K before V."""
    return [f"model.layers.{i}.self_attn.{kv}" for i in range(num_layers) for kv in KV_SCALES]


def per_row(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A weight's scale in fp8_linear's form, float32 [rows]; a per-tensor scale is repeated on
    every row, which is exact."""
    return scale.float().reshape(-1).expand(rows).contiguous()


def read_quantization(hf: dict, shapes: dict[str, tuple[int, ...]]) -> Quantization | None:
    """Parses and checks config.json's quantization_config (None when there is none). `shapes`
    is the model's parameters (checkpoint.expected_shapes), whose Linear weights the config's
    targets are matched against."""
    raw = hf.get("quantization_config")
    if raw is None:
        return None
    method = raw.get("quant_method") if isinstance(raw, dict) else raw
    if method != QUANT_METHOD:
        raise BuildError(f"config.json: quantization_config quant_method {method!r} is not supported; "
                         f"{SUPPORTED} in the {QUANT_METHOD} format")
    # compressed-tensors imports transformers, which takes seconds: only quantized checkpoints pay.
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    try:
        config = QuantizationConfig.model_validate(raw)
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:
        raise BuildError(f"config.json: quantization_config is not a valid {QUANT_METHOD} config "
                         f"({_one_line(e)}); re-download the checkpoint") from None
    for group, scheme in config.config_groups.items():
        _check_scheme(f"config.json: quantization_config group {group!r}", scheme, config.format)
    kv = config.kv_cache_scheme
    if kv is not None and not (kv.type == "float" and kv.num_bits == 8 and kv.strategy == "tensor"
                               and kv.symmetric and not kv.dynamic):
        raise BuildError(f"config.json: quantization_config kv_cache_scheme ({_describe(kv)}) is not "
                         "supported; llama-aot reads static per-tensor FP8 K/V cache scales")
    linear = torch.nn.Linear(1, 1, bias=False, device="meta")  # every projection of HF's Llama is one
    weights = {}
    for weight in (n for n in shapes if n.endswith(_LINEAR_WEIGHTS)):
        module = weight.removesuffix(".weight")
        scheme = next((s for s in config.config_groups.values()
                       if is_match(module, linear, s.targets, config.ignore)), None)
        if scheme is not None:
            weights[weight] = scheme.weights.strategy
    return Quantization(weights, kv is not None)


def _check_scheme(where: str, scheme, default_format: str) -> None:
    w = scheme.weights
    if w is None:
        raise BuildError(f"{where} quantizes activations but not weights, which is not supported; {SUPPORTED}")
    if w.type != "float" or w.num_bits != 8:
        raise BuildError(f"{where}: {_describe(w)} weights are not supported; {SUPPORTED}")
    if w.strategy not in STRATEGIES:
        raise BuildError(f"{where}: {w.strategy}-wise weight scales are not supported; {SUPPORTED}")
    if not w.symmetric or w.dynamic:
        raise BuildError(f"{where}: {'dynamic' if w.dynamic else 'asymmetric'} weight quantization is not "
                         f"supported; {SUPPORTED}, symmetric and static")
    if scheme.output_activations is not None:
        raise BuildError(f"{where}: quantized output activations are not supported; {SUPPORTED}, "
                         "and outputs in the model dtype")
    fmt = scheme.format or default_format
    if fmt not in FORMATS:
        raise BuildError(f"{where}: storage format {fmt!r} is not supported; llama-aot loads FP8 weights "
                         f"stored {' or '.join(FORMATS)}")


def _describe(args) -> str:
    """What a QuantizationArgs quantizes to, as `int4, group strategy`."""
    return f"{args.type}{args.num_bits}, {args.strategy} strategy"


def _one_line(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic's ValidationError: name the first bad field
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
