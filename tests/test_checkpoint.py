"""Checkpoint loading: config translation, strict safetensors reading, memory, fingerprints.

The oracles are transformers' own LlamaConfig/LlamaForCausalLM (parameter names and shapes, and
the weights it reads back from the same files) and the public Llama 3.1 8B config.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama_aot.compiler.checkpoint import (expected_shapes, fingerprint, load_weights,
                                           model_config_from_hf, open_checkpoint)
from llama_aot.artifacts.config import RopeScaling
from llama_aot.compiler.errors import BuildError
from tiny_checkpoint import (build_tokenizer, tiny_hf_config, write_big_random_checkpoint,
                             write_tiny_llama)

# meta-llama/Llama-3.1-8B-Instruct config.json, as published.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LLAMA3_SCALING = RopeScaling(8.0, 1.0, 4.0, 8192)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Pristine tiny checkpoints, written once; tests that damage one work on a copy."""
    root = tmp_path_factory.mktemp("tiny")
    return {"untied": write_tiny_llama(root / "untied", shards=2),
            "tied": write_tiny_llama(root / "tied", tie_word_embeddings=True, shards=2, seed=1),
            "single": write_tiny_llama(root / "single", shards=1, seed=2)}


@pytest.fixture
def ckpt_copy(tiny_dirs, tmp_path):
    def copy(kind="untied"):
        return Path(shutil.copytree(tiny_dirs[kind], tmp_path / kind))
    return copy


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------ config


def test_real_llama31_8b_config():
    cfg = model_config_from_hf(LLAMA31_8B)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (128256, 4096, 14336)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_SCALING
    assert cfg.max_position_embeddings == 131072 and cfg.rms_norm_eps == 1e-5
    assert cfg.bos_token_id == 128000 and cfg.eos_token_ids == (128001, 128008, 128009)
    assert not cfg.tie_word_embeddings


def test_generation_config_eos_is_merged():
    base = dict(LLAMA31_8B, eos_token_id=128001)
    cfg = model_config_from_hf(base, {"eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000})
    assert cfg.eos_token_ids == (128001, 128008, 128009)


def test_rope_formats_agree():
    """transformers <5 (rope_scaling, with 'rope_type' or the older 'type') and transformers 5
    (rope_parameters carrying rope_theta) describe the same RoPE."""
    legacy = dict(LLAMA31_8B, rope_scaling={**LLAMA31_8B["rope_scaling"], "type": "llama3"})
    del legacy["rope_scaling"]["rope_type"]
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    configs = [model_config_from_hf(c) for c in (LLAMA31_8B, legacy, v5)]
    assert configs[0] == configs[1] == configs[2]


def test_transformers_written_config(tiny_dirs):
    hf = json.loads((tiny_dirs["untied"] / "config.json").read_text())
    cfg = model_config_from_hf(hf)
    ref = tiny_hf_config()
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64) and cfg.rope_theta == 500000.0
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 16, ref.vocab_size)


def test_default_rope_and_defaults():
    hf = {k: v for k, v in LLAMA31_8B.items()
          if k not in ("rope_scaling", "rope_theta", "num_key_value_heads", "tie_word_embeddings")}
    cfg = model_config_from_hf(dict(hf, architectures=None))
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0
    assert cfg.num_kv_heads == 32 and cfg.head_dim == 128 and not cfg.tie_word_embeddings
    v5_default = dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert model_config_from_hf(v5_default).rope_theta == 1e6


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"]}, "config.json: unsupported architecture MistralForCausalLM"),
    ({"architectures": None, "model_type": "gemma"}, "config.json: unsupported architecture 'gemma'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "config.json: rope_scaling rope_type 'yarn' is not"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "config.json: rope_scaling of type llama3 is "
                                                                "missing key 'low_freq_factor'"),
    ({"rope_scaling": dict(LLAMA31_8B["rope_scaling"], high_freq_factor=0.5)},
     "config.json: rope_scaling: invalid"),
    ({"attention_bias": True}, "config.json: attention_bias"),
    ({"mlp_bias": True}, "config.json: mlp_bias"),
    ({"hidden_act": "gelu"}, "config.json: hidden_act 'gelu'"),
    ({"pretraining_tp": 2}, "config.json: pretraining_tp 2"),
    ({"hidden_size": None}, "config.json: missing key 'hidden_size'"),
    ({"num_attention_heads": 6}, "config.json: model config: num_heads (6) is not a multiple"),
])
def test_config_rejections(change, message):
    with pytest.raises(BuildError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        model_config_from_hf({**LLAMA31_8B, **change})


@pytest.mark.parametrize("tie", [False, True])
def test_expected_shapes_match_transformers(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama8b = LlamaConfig(**dict(LLAMA31_8B, tie_word_embeddings=tie))
    for hf_cfg in (tiny_hf_config(tie_word_embeddings=tie), llama8b):
        with torch.device("meta"):
            model = LlamaForCausalLM(hf_cfg)
        ref = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert expected_shapes(model_config_from_hf(hf_cfg.to_dict())) == ref


# ----------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ["untied", "tied", "single"])
def test_load_matches_transformers(tiny_dirs, kind):
    from transformers import LlamaForCausalLM

    ckpt = open_checkpoint(tiny_dirs[kind])
    assert len(ckpt.weight_files) == (1 if kind == "single" else 2)
    assert ckpt.config.tie_word_embeddings == (kind == "tied")
    weights = load_weights(ckpt, torch.float32)
    ref = LlamaForCausalLM.from_pretrained(tiny_dirs[kind]).state_dict()
    if kind == "tied":
        ref.pop("lm_head.weight")
    assert weights.keys() == ref.keys()
    for name, t in weights.items():
        assert t.dtype == torch.float32 and torch.equal(t, ref[name]), name
    bf16 = load_weights(ckpt, torch.bfloat16)
    assert all(torch.equal(bf16[n], ref[n].to(torch.bfloat16)) for n in ref)


def test_tiny_model_is_not_degenerate(tiny_dirs):
    from transformers import LlamaForCausalLM

    for kind in ("untied", "tied"):
        model = LlamaForCausalLM.from_pretrained(tiny_dirs[kind]).eval()
        prompt = torch.tensor([build_tokenizer().encode("Hello, world! The quick brown fox").ids])
        out = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert len(set(out[0, prompt.shape[1]:].tolist())) > 4, kind


def test_tokenizer_files_and_chat_template(tiny_dirs):
    ckpt = open_checkpoint(tiny_dirs["untied"])
    assert set(ckpt.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert build_tokenizer().get_vocab_size() == ckpt.config.vocab_size
    assert build_tokenizer().to_str() == build_tokenizer().to_str()
    assert "<|start_header_id|>" in ckpt.chat_template
    assert ckpt.config.eos_token_ids == tuple(ckpt.generation_config["eos_token_id"])


def test_chat_template_sources(ckpt_copy):
    d = ckpt_copy()
    _edit_json(d / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "T"},
                                                          {"name": "default", "template": "D"}])
    assert open_checkpoint(d).chat_template == "D"
    (d / "chat_template.jinja").write_text("J")
    ckpt = open_checkpoint(d)
    assert ckpt.chat_template == "J" and "chat_template.jinja" in ckpt.tokenizer_files


def test_weights_are_writable_views_that_leave_the_file_alone(tiny_dirs):
    ckpt = open_checkpoint(tiny_dirs["single"])
    before = (tiny_dirs["single"] / "model.safetensors").read_bytes()
    w = load_weights(ckpt, torch.float32)
    norm = w["model.norm.weight"].clone()
    w["model.norm.weight"].add_(1.0)
    assert (tiny_dirs["single"] / "model.safetensors").read_bytes() == before
    assert torch.equal(load_weights(ckpt, torch.float32)["model.norm.weight"], norm)


def test_tied_config_ignores_lm_head_and_inv_freq_is_ignored(ckpt_copy):
    from safetensors.torch import load_file, save_file

    d = ckpt_copy("single")
    _edit_json(d / "config.json", tie_word_embeddings=True)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, d / "model.safetensors")
    w = load_weights(open_checkpoint(d), torch.float32)
    assert "lm_head.weight" not in w and not any("inv_freq" in n for n in w)


def test_misaligned_data_is_read_correctly(ckpt_copy, tiny_dirs):
    """The format does not require aligned data; a header of odd length must still load right."""
    d = ckpt_copy("single")
    pad = 0
    while True:
        _rewrite_header(d / "model.safetensors", lambda h: h.update(__metadata__={"pad": "x" * pad}))
        if int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little") % 4:
            break
        pad += 1
    w = load_weights(open_checkpoint(d), torch.float32)
    ref = load_weights(open_checkpoint(tiny_dirs["single"]), torch.float32)
    assert all(torch.equal(w[n], ref[n]) for n in ref)


# ------------------------------------------------------------------------------- bad inputs


def _rewrite_header(path: Path, mutate):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


SHARD2 = "model-00002-of-00002.safetensors"


def test_truncated_shard(ckpt_copy):
    d = ckpt_copy()
    with open(d / SHARD2, "r+b") as f:
        f.truncate(os.path.getsize(d / SHARD2) - 100)
    with pytest.raises(BuildError, match=rf"^{SHARD2}: truncated: header describes \d+ bytes of tensor data "
                                         r"but the file holds \d+; re-download"):
        open_checkpoint(d)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:8] + b"#" * 20 + raw[28:], "corrupt header: not valid JSON"),
    (lambda raw: (10**12).to_bytes(8, "little") + raw[8:], "header length 1000000000000 is implausible"),
    (lambda raw: raw[:5], "file is 5 bytes, too short to be a safetensors file"),
])
def test_corrupt_header(ckpt_copy, damage, message):
    d = ckpt_copy()
    (d / SHARD2).write_bytes(damage((d / SHARD2).read_bytes()))
    with pytest.raises(BuildError, match=f"^{SHARD2}: {message}"):
        open_checkpoint(d)


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="F7"), "unknown dtype 'F7'"),
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[3, 3]), "needs 36 bytes but"),
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[5]), "corrupt header entry"),
])
def test_bad_header_entries(ckpt_copy, mutate, message):
    d = ckpt_copy()
    _rewrite_header(d / SHARD2, mutate)
    with pytest.raises(BuildError, match=f"^{SHARD2}: .*{message}"):
        open_checkpoint(d)


def test_missing_shard(ckpt_copy):
    d = ckpt_copy()
    (d / SHARD2).unlink()
    with pytest.raises(BuildError, match=f"model.safetensors.index.json: lists {SHARD2}, which is missing"):
        open_checkpoint(d)


def test_index_names_missing_tensor(ckpt_copy):
    d = ckpt_copy()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = SHARD2
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BuildError, match=f"{SHARD2}: .*promises tensor model.layers.7.mlp.up_proj.weight"):
        open_checkpoint(d)


def test_shape_mismatch(ckpt_copy):
    d = ckpt_copy()
    _edit_json(d / "config.json", intermediate_size=256)
    ckpt = open_checkpoint(d)
    with pytest.raises(BuildError, match=r"^model.layers.0.mlp.gate_proj.weight in model-0000\d-of-00002."
                                         r"safetensors has shape \[128, 64\] but config.json implies "
                                         r"\[256, 64\]"):
        load_weights(ckpt, torch.float32)


def test_missing_and_unexpected_tensors(ckpt_copy):
    d = ckpt_copy()
    _edit_json(d / "config.json", num_hidden_layers=3)
    with pytest.raises(BuildError, match=r"missing 9 tensors that config.json implies: model.layers.2.\S+ "
                                         r".*\(and 4 more\)"):
        load_weights(open_checkpoint(d), torch.float32)
    _edit_json(d / "config.json", num_hidden_layers=1)
    with pytest.raises(BuildError,
                       match=r"^model-0000\d-of-00002.safetensors: unexpected tensors model.layers.1."):
        load_weights(open_checkpoint(d), torch.float32)


def test_untied_config_needs_lm_head(ckpt_copy):
    d = ckpt_copy("tied")
    _edit_json(d / "config.json", tie_word_embeddings=False)
    with pytest.raises(BuildError, match="missing 1 tensors that config.json implies: lm_head.weight"):
        load_weights(open_checkpoint(d), torch.float32)


def test_unsupported_architecture_and_corrupt_config(ckpt_copy):
    d = ckpt_copy()
    _edit_json(d / "config.json", architectures=["Qwen2ForCausalLM"])
    with pytest.raises(BuildError, match="^config.json: unsupported architecture Qwen2ForCausalLM"):
        open_checkpoint(d)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(BuildError, match="^config.json: not valid JSON"):
        open_checkpoint(d)


def test_directory_problems(ckpt_copy, tmp_path):
    with pytest.raises(BuildError, match="not a directory"):
        open_checkpoint(tmp_path / "nope")
    d = ckpt_copy()
    (d / "tokenizer.json").unlink()
    with pytest.raises(BuildError, match="no tokenizer.json"):
        open_checkpoint(d)
    d = ckpt_copy("single")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(BuildError, match="found pytorch_model.bin.*only reads safetensors"):
        open_checkpoint(d)


# ---------------------------------------------------------------------------------- memory

_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch
    from llama_aot.compiler.checkpoint import open_checkpoint, load_weights
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    ckpt = open_checkpoint(sys.argv[1])
    before = status("VmRSS")
    weights = load_weights(ckpt, getattr(torch, sys.argv[2]))
    checksum = sum(float(t.sum()) for t in weights.values())  # touch every page
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    print(json.dumps({"delta": peak - before, "hwm_delta": status("VmHWM") - before,
                      "nbytes": nbytes, "start_maxrss": start_maxrss, "before": before}))
""")
# Linux carries a parent's peak RSS into ru_maxrss across fork+exec (signal->maxrss), so a child
# of the (large) pytest process would report pytest's peak. A small launcher in between starts the
# measured process from a fresh, small address space.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@pytest.mark.parametrize("stored, target, file_bytes", [(torch.float32, "float32", 256 << 20),
                                                       (torch.bfloat16, "float32", 128 << 20)])
def test_peak_memory_of_loading(tmp_path, stored, target, file_bytes):
    """Stored in the target dtype, loading maps the files (1x); converted (bf16 on disk to float32,
    the CPU default), it drops each source page once read, so it never holds file + output."""
    d = write_big_random_checkpoint(tmp_path / "big", file_bytes, dtype=stored)
    if stored == torch.float32:
        assert sum(f.stat().st_size for f in d.glob("*.safetensors")) >= 200 << 20
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _RSS_SCRIPT, str(d), target],
                         env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["start_maxrss"] < 100 << 20, result  # ru_maxrss was not inherited
    assert result["nbytes"] >= 200 << 20
    assert result["delta"] < 1.3 * result["nbytes"], result
    assert result["hwm_delta"] < 1.3 * result["nbytes"], result


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint(ckpt_copy, tmp_path):
    d = ckpt_copy()
    fp = fingerprint(open_checkpoint(d))
    assert len(fp) == 64 and fingerprint(open_checkpoint(d)) == fp
    moved = Path(shutil.copytree(d, tmp_path / "moved"))  # copy2 keeps mtimes: same inputs
    assert fingerprint(open_checkpoint(moved)) == fp

    seen = {fp}

    def changed(edit):
        edit()
        new = fingerprint(open_checkpoint(d))
        assert new not in seen
        seen.add(new)

    changed(lambda: _edit_json(d / "config.json", rms_norm_eps=1e-6))
    changed(lambda: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + " "))
    changed(lambda: _edit_json(d / "generation_config.json", temperature=0.7))
    changed(lambda: _edit_json(d / "tokenizer_config.json", chat_template="X"))
    st = (d / SHARD2).stat()
    changed(lambda: os.utime(d / SHARD2, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000)))

    def flip_last_byte():
        raw = bytearray((d / SHARD2).read_bytes())
        raw[-1] ^= 0xFF
        (d / SHARD2).write_bytes(bytes(raw))
        os.utime(d / SHARD2, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    changed(flip_last_byte)
    changed(lambda: _rewrite_header(d / SHARD2, lambda h: h.setdefault("__metadata__", {}).update(x="1")))
