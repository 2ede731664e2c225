"""The weights loader's contract: it returns what safetensors' own loader returns, for every dtype and
shape, as views of one buffer; a file that differs from its digest by one byte, or is cut short,
returns nothing; the digest is the documented one; and loading costs about one hashing pass."""
import hashlib
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_aot.artifacts.digest import DigestMismatch, file_matches, hash_file
from llama_aot.artifacts.errors import ArtifactError
from llama_aot.artifacts.weights_file import read_weights, write_weights
from llama_aot.runtime import weights_loader
from llama_aot.runtime.artifact import load_weights
from llama_aot.runtime.weights_loader import CUDA_ALIGNMENT, CUDA_DATA_ALIGNMENT, DTYPES, load_safetensors

WEIGHTS = "step.rank0.safetensors"

SMALL_CHUNK = 4096
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def sample_tensors() -> dict[str, torch.Tensor]:
    """Every dtype in 0-d, empty and odd shapes (odd byte sizes misalign the tensors after them, which
    must then be copied out), plus one tensor spanning many SMALL_CHUNKs, stored first (safetensors
    orders by dtype size, then name) and so aligned."""
    g = torch.Generator().manual_seed(0)
    tensors = {"A.big": torch.randn(300, 257, generator=g, dtype=torch.float64)}
    for code, dtype in DTYPES.items():
        for shape in [(), (0,), (3, 0, 2), (5,), (3, 5, 7), (64, 33)]:
            values = torch.randn(shape, generator=g) * 8 if dtype.is_floating_point else torch.randint(0, 100, shape, generator=g)
            tensors[f"{code}.{'x'.join(map(str, shape)) or 'scalar'}"] = values.to(dtype)
    return tensors


@pytest.fixture
def sample_file(tmp_path):
    path = tmp_path / "sample.safetensors"
    save_file(sample_tensors(), str(path), metadata={"note": "kept"})
    return path


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a.cpu().reshape(-1).view(torch.uint8),
                                                                    b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_matches_safetensors(sample_file, device):
    entry = hash_file(sample_file, SMALL_CHUNK)
    assert entry["size"] > 20 * SMALL_CHUNK
    tensors, metadata = load_safetensors(sample_file, device, entry)
    reference = load_file(str(sample_file))
    assert metadata == {"note": "kept"} and sorted(tensors) == sorted(reference)
    for name, expected in reference.items():
        assert same_bytes(tensors[name], expected), name
        assert tensors[name].device.type == device
        assert tensors[name].data_ptr() % (CUDA_ALIGNMENT if device == "cuda" else expected.element_size()) == 0, name
    assert tensors["A.big"].untyped_storage().nbytes() >= entry["size"], "the large tensor is a view, not a copy"


@pytest.mark.parametrize("device", DEVICES)
def test_aligned_tensors_share_one_buffer(tmp_path, device):
    path = tmp_path / "aligned.safetensors"
    save_file({f"w{i}": torch.full((16, 8), float(i)) for i in range(10)}, str(path))
    tensors, _ = load_safetensors(path, device, hash_file(path, SMALL_CHUNK))
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == 1
    assert all(torch.equal(tensors[f"w{i}"].cpu(), torch.full((16, 8), float(i))) for i in range(10))


@pytest.mark.gpu
def test_matrices_start_on_the_boundary_matmuls_stream_fastest_from(tmp_path):
    """Whatever the header's length, a tensor at a 256-byte multiple of the data section is on a
    256-byte boundary of the GPU (cuBLAS lost 2-7% on weights 16 bytes off one)."""
    for name_length in (1, 5, 13):  # header lengths that leave the data section off a boundary in the file
        path = tmp_path / f"{name_length}.safetensors"
        save_file({"w" * name_length + str(i): torch.zeros(64, 2) for i in range(3)}, str(path))
        tensors, _ = load_safetensors(path, "cuda", hash_file(path, SMALL_CHUNK))
        assert all(t.data_ptr() % CUDA_DATA_ALIGNMENT == 0 for t in tensors.values()), name_length


def test_digest_is_the_documented_hash_of_chunk_hashes(sample_file):
    data = sample_file.read_bytes()
    chunks = b"".join(hashlib.sha256(data[i:i + SMALL_CHUNK]).digest() for i in range(0, len(data), SMALL_CHUNK))
    assert hash_file(sample_file, SMALL_CHUNK) == {"size": len(data), "chunk_size": SMALL_CHUNK,
                                                   "root_sha256": hashlib.sha256(chunks).hexdigest()}
    empty = sample_file.with_name("empty")
    empty.write_bytes(b"")
    assert hash_file(empty)["root_sha256"] == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("device", DEVICES)
def test_a_flipped_byte_in_any_chunk_is_refused(sample_file, device):
    entry = hash_file(sample_file, SMALL_CHUNK)
    size = entry["size"]
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    for position in [0, 9, SMALL_CHUNK - 1, SMALL_CHUNK, size // 2, size - SMALL_CHUNK, size - 1]:
        with open(sample_file, "r+b") as f:
            f.seek(position)
            original = f.read(1)
            f.seek(position)
            f.write(bytes([original[0] ^ 0x10]))
        with pytest.raises(DigestMismatch):
            load_safetensors(sample_file, device, entry)
        assert not file_matches(sample_file, entry)
        with open(sample_file, "r+b") as f:
            f.seek(position)
            f.write(original)
    if device == "cuda":
        assert torch.cuda.memory_allocated() == allocated, "a refused file's device buffer was kept"
    assert file_matches(sample_file, entry)


@pytest.mark.parametrize("device", DEVICES)
def test_a_truncated_file_is_refused(sample_file, device):
    entry = hash_file(sample_file, SMALL_CHUNK)
    os.truncate(sample_file, entry["size"] - 1)
    with pytest.raises(DigestMismatch, match="bytes, the manifest says"):
        load_safetensors(sample_file, device, entry)
    assert not file_matches(sample_file, entry)


def test_tied_aliases_are_restored_as_the_same_tensor_and_tampering_is_an_artifact_error(tmp_path):
    embed, norm = torch.randn(32, 8), torch.ones(8)
    path = tmp_path / WEIGHTS
    write_weights(path, {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": norm})
    for weights in (load_weights(tmp_path, WEIGHTS, "cpu", hash_file(path)), read_weights(path, "cpu")):
        assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
        assert torch.equal(weights["lm_head.weight"], embed) and torch.equal(weights["model.norm.weight"], norm)
    entry = hash_file(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="rank0.safetensors does not match the sha256.*rebuild or re-download"):
        load_weights(tmp_path, WEIGHTS, "cpu", entry)


def test_a_header_that_does_not_fit_is_an_artifact_error(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'
    (tmp_path / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ArtifactError, match="not a valid safetensors file.*rebuild the artifact"):
        load_weights(tmp_path, WEIGHTS, "cpu", hash_file(tmp_path / WEIGHTS))


@pytest.mark.gpu
def test_cuda_reads_each_byte_once(sample_file, monkeypatch):
    read = []
    preadv = os.preadv

    def counting(fd, buffers, offset):
        n = preadv(fd, buffers, offset)
        read.append((offset, n))
        return n

    monkeypatch.setattr(weights_loader.os, "preadv", counting)
    entry = hash_file(sample_file, SMALL_CHUNK)
    load_safetensors(sample_file, "cuda", entry)
    assert sorted(read) == [(o, min(SMALL_CHUNK, entry["size"] - o)) for o in range(0, entry["size"], SMALL_CHUNK)]


def test_loading_costs_about_one_hashing_pass(tmp_path):
    """Robust on any core count: the old way hashed the whole file on one thread and then loaded it;
    the new way may not cost more than that one hashing pass (plus slack for a busy machine)."""
    path = tmp_path / "large.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024).to(torch.bfloat16) for i in range(64)}, str(path))  # 128 MiB
    entry = hash_file(path)

    def best_of_three(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def sha256_in_one_pass():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)

    one_pass = best_of_three(sha256_in_one_pass)
    load = best_of_three(lambda: load_safetensors(path, "cpu", entry))
    print(f"128 MiB: one sha256 pass {one_pass * 1e3:.0f} ms, verified load {load * 1e3:.0f} ms")
    assert load < 1.5 * one_pass + 0.05
