"""Open a Hugging Face Llama checkpoint directory strictly and cheaply.

Everything that can be wrong with a checkpoint (an unsupported architecture, a corrupt config, a
truncated or corrupt safetensors file, a missing shard, a tensor of the wrong shape) is found by
`open_checkpoint` and `load_weights` and reported as one `BuildError` line naming the file, before
any compile work starts. Opening reads only JSON and safetensors headers, so it costs milliseconds
even for a 405B checkpoint.

A pre-quantized checkpoint (compressed-tensors FP8, compiler/compressed_tensors.py) is checked the
same way: each FP8 weight must come with a scale of the right shape.

The safetensors reader is written against the file format (8-byte little-endian header length, a
JSON header of dtype/shape/data_offsets, then raw data) instead of `safetensors.torch.load_file`:
that gives us our own error messages and lets us memory-map each file once (ACCESS_COPY, so the
returned tensors are writable views with no copy) and convert dtypes tensor by tensor, so loading
never holds a second full copy of the weights.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_aot.artifacts.config import ModelConfig, RopeScaling
from llama_aot.artifacts.errors import ConfigError
from llama_aot.compiler.compressed_tensors import (FP8_DTYPE, Quantization, kv_scale_names, per_row,
                                                   read_quantization, weight_scale_name)
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.mapped_files import map_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
# Buffers some exporters save next to the parameters; they are recomputed from config.json.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100_000_000  # the limit the reference safetensors implementation enforces
CONVERT_CHUNK_BYTES = 16 << 20

# ---------------------------------------------------------------------------------------- config


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers <5 writes `rope_theta` + `rope_scaling` ({"rope_type"|"type": "llama3", ...});
    transformers 5 writes `rope_parameters` holding the type, the llama3 keys and rope_theta."""
    params = hf.get("rope_parameters")
    where = "rope_parameters" if isinstance(params, dict) else "rope_scaling"
    if not isinstance(params, dict):
        params = hf.get("rope_scaling")
    params = params or {}
    if not isinstance(params, dict):
        raise BuildError(f"config.json: {where} must be an object, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise BuildError(f"config.json: {where} rope_type {rope_type!r} is not supported; llama-aot "
                         "implements the 'default' and 'llama3' RoPE of Llama 3.x")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise BuildError(f"config.json: {where} of type llama3 is missing key {missing[0]!r}")
    return float(theta), RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                                     float(params["high_freq_factor"]),
                                     int(params["original_max_position_embeddings"]))


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def model_config_from_hf(hf: dict, generation_config: dict | None = None,
                         architecture: str = "LlamaForCausalLM") -> ModelConfig:
    """Translate a Hugging Face config.json (plus generation_config.json, whose eos ids are merged
    in: Llama 3.1 Instruct lists its three stop tokens only there) into our ModelConfig.
    `architecture`: what `architectures` must name (an EAGLE-3 head's config is a Llama config
    under another name, compiler/eagle_head.py)."""
    archs = hf.get("architectures")
    if archs:
        if architecture not in archs:
            raise BuildError(f"config.json: unsupported architecture {', '.join(map(str, archs))}; "
                             f"expected {architecture}")
    elif hf.get("model_type") != "llama":
        raise BuildError(f"config.json: unsupported architecture {hf.get('model_type')!r} (no "
                         "'architectures' and model_type is not 'llama'); llama-aot compiles "
                         "LlamaForCausalLM checkpoints")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise BuildError(f"config.json: {key} is true; llama-aot supports Llama without biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise BuildError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; Llama uses 'silu'")
    if (hf.get("pretraining_tp") or 1) > 1:
        raise BuildError(f"config.json: pretraining_tp {hf['pretraining_tp']} is not supported; "
                         "set it to 1 (it only changes how transformers splits matmuls)")

    def req(key: str) -> Any:
        if hf.get(key) is None:
            raise BuildError(f"config.json: missing key {key!r}")
        return hf[key]

    heads, hidden = req("num_attention_heads"), req("hidden_size")
    eos = _ids(hf.get("eos_token_id"))
    gen = generation_config or {}
    eos += [i for i in _ids(gen.get("eos_token_id")) if i not in eos]
    bos = hf.get("bos_token_id") if hf.get("bos_token_id") is not None else gen.get("bos_token_id")
    fields = dict(
        vocab_size=req("vocab_size"), hidden_size=hidden, intermediate_size=req("intermediate_size"),
        num_layers=req("num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or (hidden // heads if isinstance(heads, int) and heads > 0 else 0),
        rms_norm_eps=float(req("rms_norm_eps")), max_position_embeddings=req("max_position_embeddings"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos))
    try:
        theta, scaling = _rope(hf)
        return ModelConfig(rope_theta=theta, rope_scaling=scaling, **fields)
    except (BuildError, ConfigError) as e:
        raise e if str(e).startswith("config.json") else BuildError(f"config.json: {e}") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameters of HF LlamaForCausalLM for `cfg`, by their HF names."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes

# ----------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `begin`/`end` are absolute byte offsets into `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: Path) -> tuple[bytes, dict[str, TensorInfo]]:
    """Parse and validate one safetensors header; returns the raw header bytes and its tensors."""
    def bad(problem: str) -> BuildError:
        return BuildError(f"{path.name}: {problem}; re-download or re-save the checkpoint")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"file is {size} bytes, too short to be a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header length {n} is implausible for a file of {size} bytes (not a "
                      "safetensors file, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"corrupt header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("corrupt header: not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) \
                and type(begin) is int and type(end) is int and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"corrupt header entry for {name!r}: {entry!r}")
        if dtype not in DTYPES:
            raise bad(f"tensor {name} has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPES[dtype][1] != end - begin:
            raise bad(f"tensor {name}: shape {shape} of {dtype} needs {numel * DTYPES[dtype][1]} "
                      f"bytes but its data_offsets span {end - begin}")
        data_end = max(data_end, end)
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), 8 + n + begin, 8 + n + end)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise bad(f"corrupt header: tensors {prev} and {name} overlap")
    if 8 + n + data_end > size:
        raise bad(f"truncated: header describes {data_end} bytes of tensor data but the file "
                  f"holds {size - 8 - n}")
    return prefix + raw, tensors


def _weight_files(root: Path) -> list[Path]:
    """The safetensors files transformers would load: model.safetensors, else the index's shards."""
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        others = sorted(p.name for p in root.glob("*.safetensors"))
        if others:
            raise BuildError(f"{root}: found {', '.join(others[:3])} but no {INDEX_FILE} naming the "
                             "shards; restore the index file or re-save the checkpoint")
        found = sorted(p.name for p in [*root.glob("*.bin"), *root.glob("*.pth")])
        found_msg = f" (found {', '.join(found[:3])})" if found else ""
        raise BuildError(f"{root}: no safetensors weights{found_msg}; llama-aot only reads safetensors. "
                         "Convert with transformers: AutoModelForCausalLM.from_pretrained(dir)"
                         ".save_pretrained(dir, safe_serialization=True)")
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BuildError(f"{INDEX_FILE}: no 'weight_map' object; re-download or re-save the checkpoint")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not (root / name).is_file():
            raise BuildError(f"{INDEX_FILE}: lists {name}, which is missing from {root}; download "
                             "every shard of the checkpoint")
        files.append(root / name)
    return files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BuildError(f"{path.name}: not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path.name}: expected a JSON object; re-download the checkpoint")
    return data

# ------------------------------------------------------------------------------------ checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint directory. `tensors` is the parsed safetensors headers, so loading
    weights later needs no second parse and every tensor's file is known. `quantization` is what
    config.json's compressed-tensors quantization_config says, or None for an unquantized checkpoint."""

    path: Path
    config: ModelConfig
    weight_files: tuple[Path, ...]
    tokenizer_files: dict[str, Path]
    chat_template: str | None
    generation_config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)
    quantization: Quantization | None = None

    @property
    def prequantized(self) -> bool:
        """Whether the checkpoint's weights are already FP8, which makes any build of it an FP8 build."""
        return self.quantization is not None and bool(self.quantization.weights)


def _chat_template(tokenizer_files: dict[str, Path]) -> str | None:
    if "chat_template.jinja" in tokenizer_files:
        return tokenizer_files["chat_template.jinja"].read_text(encoding="utf-8")
    if "tokenizer_config.json" not in tokenizer_files:
        return None
    template = _read_json(tokenizer_files["tokenizer_config.json"]).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate a checkpoint directory and parse every header, so a corrupt download fails here."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise BuildError(f"{path}: not a directory; pass a Hugging Face checkpoint directory")
    if not (root / "config.json").is_file():
        raise BuildError(f"{root}: no config.json; pass a Hugging Face checkpoint directory")
    hf = _read_json(root / "config.json")
    if not (root / "tokenizer.json").is_file():
        raise BuildError(f"{root}: no tokenizer.json; the artifact must carry the tokenizer. Save it "
                         "with AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
    tok_files = {n: root / n for n in TOKENIZER_FILES if (root / n).is_file()}
    gen = _read_json(tok_files["generation_config.json"]) if "generation_config.json" in tok_files else {}
    config = model_config_from_hf(hf, gen)
    quantization = read_quantization(hf, expected_shapes(config))
    files = _weight_files(root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in _read_header(f)[1].items():
            if name in tensors:
                raise BuildError(f"{f.name}: tensor {name} is also in {tensors[name].file.name}; "
                                 "re-save the checkpoint")
            tensors[name] = info
    if (root / INDEX_FILE).is_file() and files != [root / SINGLE_FILE]:
        for name, fname in _read_json(root / INDEX_FILE)["weight_map"].items():
            if name not in tensors or tensors[name].file.name != fname:
                raise BuildError(f"{fname}: {INDEX_FILE} promises tensor {name} but the file lacks "
                                 "it; re-download the checkpoint")
    return Checkpoint(root, config, tuple(files), tok_files, _chat_template(tok_files), gen, tensors,
                      quantization)


def _check_names(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    shapes = expected_shapes(ckpt.config)
    quant = ckpt.quantization
    fp8 = quant.weights if quant else {}
    scales = quant.scale_shapes(shapes, ckpt.config.num_layers) if quant else {}
    missing = [n for n in shapes if n not in ckpt.tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise BuildError(f"{ckpt.path}: missing {len(missing)} tensors that config.json implies: "
                         f"{', '.join(missing[:5])}{more}; the checkpoint is incomplete or does not "
                         "match config.json")
    for name, allowed in scales.items():
        if name not in ckpt.tensors:
            raise BuildError(f"{ckpt.path}: missing {name} (shape {list(allowed[0])}), a scale that "
                             "config.json's quantization_config implies; the checkpoint is incomplete")
    ignorable = {"lm_head.weight"} if ckpt.config.tie_word_embeddings else set()
    ignorable |= quant.ignored() if quant else set()
    extra = [t for n, t in ckpt.tensors.items() if n not in shapes and n not in scales and n not in ignorable
             and not n.endswith(IGNORABLE_SUFFIXES)]
    if extra:
        names = ", ".join(t.name for t in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise BuildError(f"{extra[0].file.name}: unexpected tensors {names}; not part of "
                         "LlamaForCausalLM for this config.json (a quantized or different-architecture "
                         "checkpoint?)")
    for name, shape in shapes.items():
        info = ckpt.tensors[name]
        if info.shape != shape:
            raise BuildError(f"{name} in {info.file.name} has shape {list(info.shape)} but config.json "
                             f"implies {list(shape)}; the weights and config.json do not match")
        if name not in fp8 and info.dtype not in FLOAT_WEIGHT_DTYPES:
            raise BuildError(f"{name} in {info.file.name} is stored as {info.dtype}; llama-aot reads "
                             f"{'/'.join(FLOAT_WEIGHT_DTYPES)} weights, and {FP8_DTYPE} ones that a "
                             "compressed-tensors quantization_config in config.json declares")
    if quant:
        quant.check_dtypes(ckpt.tensors, scales)
    return shapes


def _map(ckpt: Checkpoint, path: Path) -> mmap.mmap:
    need = max(t.end for t in ckpt.tensors.values() if t.file == path)
    if path.stat().st_size < need:
        raise BuildError(f"{path.name}: truncated since it was opened ({path.stat().st_size} bytes, "
                         f"needs {need}); re-download the checkpoint")
    return map_file(path)


def _view(mm: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    dtype, itemsize = DTYPES[info.dtype]
    numel = (info.end - info.begin) // itemsize
    if numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    if info.begin % itemsize:  # misaligned data: copy into aligned memory
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.end - info.begin, offset=info.begin)
        return raw.clone().view(dtype).reshape(info.shape)
    return torch.frombuffer(mm, dtype=dtype, count=numel, offset=info.begin).reshape(info.shape)


def _convert(mm: mmap.mmap, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Convert chunk by chunk, dropping each source page once read, so that converting (say) a
    bf16 checkpoint to float32 peaks at the output plus one chunk, not output plus file."""
    src = _view(mm, info).reshape(-1)
    out = torch.empty(info.shape, dtype=dtype)
    flat = out.view(-1)
    step = max(1, CONVERT_CHUNK_BYTES // src.element_size())
    page = mmap.PAGESIZE
    dropped = -(-info.begin // page) * page
    for a in range(0, src.numel(), step):
        b = min(a + step, src.numel())
        flat[a:b].copy_(src[a:b])
        upto = (info.begin + b * src.element_size()) // page * page
        if upto > dropped and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, dropped, upto - dropped)
            dropped = upto
    return out


def _reader(ckpt: Checkpoint):
    """`read(name, dtype)`: a tensor as a zero-copy view of its mmapped file when it is stored in
    `dtype` (or `dtype` is None), converted otherwise; each file is mapped once."""
    maps: dict[Path, mmap.mmap] = {}

    def read(name: str, dtype: torch.dtype | None) -> torch.Tensor:
        info = ckpt.tensors[name]
        if info.file not in maps:
            maps[info.file] = _map(ckpt, info.file)
        mm = maps[info.file]
        return _view(mm, info) if dtype in (None, DTYPES[info.dtype][0]) else _convert(mm, info, dtype)
    return read


def load_weights(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named weights in `dtype`: zero-copy views of the mmapped files where the stored dtype
    already matches, converted one tensor at a time otherwise. The FP8 weights of a pre-quantized
    checkpoint stay as stored, each with its `weight_scale` as float32 [rows]. Names, shapes and
    stored dtypes are all checked before any tensor data is touched."""
    shapes = _check_names(ckpt)
    fp8 = ckpt.quantization.weights if ckpt.quantization else {}
    read = _reader(ckpt)
    out = {name: read(name, None if name in fp8 else dtype) for name in shapes}
    for weight in fp8:
        out[weight_scale_name(weight)] = per_row(read(weight_scale_name(weight), torch.float32), shapes[weight][0])
    return out


def load_kv_scales(ckpt: Checkpoint) -> torch.Tensor | None:
    """The checkpoint's FP8 KV-cache scales as float32 [num_layers, 2] (K, V), or None when it has
    none (no compressed-tensors kv_cache_scheme). The tensors are checked as load_weights checks."""
    if ckpt.quantization is None or not ckpt.quantization.kv_cache_scales:
        return None
    _check_names(ckpt)
    read = _reader(ckpt)
    scales = [read(name, torch.float32).reshape(()) for name in kv_scale_names(ckpt.config.num_layers)]
    return torch.stack(scales).reshape(ckpt.config.num_layers, 2)


def fingerprint(ckpt: Checkpoint) -> str:
    """A sha256 of the build inputs that is cheap even for 400 GB: small files by content, weight
    files by name, size, mtime and raw header (any re-save rewrites at least one of those)."""
    h = hashlib.sha256(b"llama-aot checkpoint fingerprint v1\0")

    def add(tag: str, data: bytes) -> None:
        h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    add("config.json", (ckpt.path / "config.json").read_bytes())
    if (ckpt.path / INDEX_FILE).is_file():
        add(INDEX_FILE, (ckpt.path / INDEX_FILE).read_bytes())
    for name in sorted(ckpt.tokenizer_files):
        add(name, ckpt.tokenizer_files[name].read_bytes())
    for f in sorted(ckpt.weight_files):
        st = f.stat()
        add(f.name, f"{st.st_size}:{st.st_mtime_ns}".encode() + _read_header(f)[0])
    return h.hexdigest()


__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "load_weights", "load_kv_scales", "expected_shapes",
           "model_config_from_hf", "fingerprint"]
