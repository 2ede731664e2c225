"""Reading a weights file once: hashed chunk by chunk on many threads on its way to the memory the
weights run from, and handed out only after the whole file proved to match its manifest digest.

Why: an 8B artifact keeps its weights in one 16 GB safetensors file. Hashing it with one sha256
(one thread), then loading it tensor by tensor through safetensors, read every byte twice and took
20 s on the GPU machine (H100 host); this takes 1.7 s from the page cache and 12 s from a cold one,
the disk's own speed. The file is cut into fixed-size chunks that a pool of threads reads and hashes
(`os.preadv` and hashlib release the GIL):
- CUDA: each chunk is read into one of a few rotating pinned staging buffers, hashed there and copied
  without blocking into one device buffer; a staging buffer is refilled only after the event of its
  last copy.
- CPU: the file is mapped (copy-on-write) and hashed through the mapping, so the tensors are the
  page cache's pages, as with safetensors' own CPU loading. Reading it into fresh memory instead
  costs a second copy of the weights and, measured on the CPU machine, more in page faults than
  the hashing itself.
The weights are then views into that one buffer, placed by the safetensors header (8-byte
little-endian header length, a JSON header with dtype, shape and data_offsets, then the data), which
is parsed from the verified bytes themselves. On a mismatch the buffer is dropped before anything
refers to it.

The digest is the manifest's (artifacts/digest.py), computed here on the chunks as they stream past.

Alignment: Inductor's Triton kernels assume 16-byte aligned weights (torch._inductor.utils.ALIGNMENT),
and cuBLAS streams a weight fastest from a 128-byte boundary. On CUDA the file sits in its buffer
shifted to start its data section on a 256-byte boundary, so every tensor whose offset in the file
is a multiple of 256 (every matrix of a Llama checkpoint) starts on one. On the H200, batch-1
matmuls over weights 16 bytes off such a boundary ran 2-7% slower (gate_up 58.5 against 54.9 us,
the LM head 250 against 238 us). Inductor's C++ kernels load unaligned, so on CPU a tensor needs only
its dtype's alignment. A tensor that misses its alignment is copied out on its own.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
from pathlib import Path

import torch

from llama_aot.artifacts.digest import CHUNK_SIZE, DigestMismatch, hash_chunks, map_chunks, root, threads

CUDA_ALIGNMENT = 16  # what a CUDA tensor must have, or it is copied out
CUDA_DATA_ALIGNMENT = 256  # where the data section starts, for the matmuls' speed
STAGING_PER_THREAD = 2
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
          "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path: Path, device: str | torch.device,
                     expected: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, the header's `__metadata__`), read once onto `device`. With `expected` (a
    `hash_file` entry) nothing is returned unless the file matches it; without, nothing is checked
    (the build reading back what it just wrote). Raises DigestMismatch, or ValueError for a file
    that is not valid safetensors."""
    with open(path, "rb") as f:
        prefix = f.read(8)
    data_start = 8 + int.from_bytes(prefix, "little")  # unverified: it only chooses the alignment
    return _tensors(path, _read_verified(path, device, expected, align_at=data_start))


def _read_verified(path: Path, device: str | torch.device, expected: dict | None, align_at: int) -> torch.Tensor:
    """The file's bytes as one uint8 tensor on `device`, read once (on CUDA with byte `align_at`
    on a CUDA_DATA_ALIGNMENT boundary); with `expected`, only if they match it."""
    device = torch.device(device)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if expected is not None and size != expected["size"]:
            raise DigestMismatch(f"{path}: {size} bytes, the manifest says {expected['size']}")
        chunk_size = CHUNK_SIZE if expected is None else expected["chunk_size"]
        if device.type == "cuda":
            shift = -align_at % CUDA_DATA_ALIGNMENT
            data = torch.empty(shift + size, dtype=torch.uint8, device=device)[shift:]
            digests = _stream_to_cuda(f.fileno(), data, chunk_size, verify=expected is not None)
        else:
            data, digests = _map_to_host(f, size, chunk_size, verify=expected is not None)
    if expected is not None and root(digests) != expected["root_sha256"]:
        del data  # the traceback keeps this frame alive: let the memory go now
        raise DigestMismatch(f"{path}: contents differ from the manifest's digest")
    return data


def _map_to_host(f, size: int, chunk_size: int, verify: bool) -> tuple[torch.Tensor, list[bytes]]:
    """The file mapped copy-on-write (writable, so torch may wrap it; nothing writes to it)."""
    if size == 0:
        return torch.empty(0, dtype=torch.uint8), []
    mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    digests = hash_chunks(mapping, chunk_size) if verify else []
    return torch.frombuffer(mapping, dtype=torch.uint8), digests  # the tensor keeps the mapping open


def _stream_to_cuda(fd: int, data: torch.Tensor, chunk_size: int, verify: bool) -> list[bytes]:
    """Reads through pinned staging buffers: pinned so the copies run asynchronously, registered
    here (not taken from torch's pinned-memory cache) so they are unpinned and freed at the end."""
    count = min(STAGING_PER_THREAD * threads(), max(1, math.ceil(data.numel() / chunk_size)))
    host = torch.empty(count * chunk_size, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(host.data_ptr(), host.numel(), 1)) != 0:  # 1: portable, any device
        raise RuntimeError(f"cannot pin {host.numel()} bytes of host memory to load weights")
    staging: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(count):
        buffer = host[i * chunk_size:(i + 1) * chunk_size]
        staging.put((buffer, memoryview(buffer.numpy()), None))
    stream = torch.cuda.current_stream(data.device)

    def read(offset: int, length: int) -> bytes:
        buffer, view, copied = staging.get()
        try:
            if copied is not None:
                copied.synchronize()
            _fill(fd, view[:length], offset)
            digest = hashlib.sha256(view[:length]).digest() if verify else b""
            with torch.cuda.stream(stream):
                data[offset:offset + length].copy_(buffer[:length], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
        finally:
            staging.put((buffer, view, copied))
        return digest

    try:
        return map_chunks(data.numel(), chunk_size, read)
    finally:
        stream.synchronize()
        cudart.cudaHostUnregister(host.data_ptr())


def _fill(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise DigestMismatch(f"file ended at byte {offset + done}, before its recorded size")
        done += n


def _tensors(path: Path, data: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    def invalid(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid safetensors file ({why})")

    if data.numel() < 8:
        raise invalid("shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8].cpu().numpy().tobytes(), "little")
    if header_len > data.numel() - 8:
        raise invalid(f"header length {header_len} exceeds the file")
    try:
        header = json.loads(data[8:8 + header_len].cpu().numpy().tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"header is not JSON: {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    body = data[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise invalid(f"tensor {name!r} has entry {info!r}") from None
        if not all(type(n) is int and n >= 0 for n in [*shape, begin, end]) or not begin <= end <= body.numel() \
                or end - begin != math.prod(shape) * dtype.itemsize:
            raise invalid(f"tensor {name!r}: shape {shape} and offsets {[begin, end]} do not fit")
        piece = body[begin:end]
        if piece.data_ptr() % (CUDA_ALIGNMENT if piece.is_cuda else dtype.itemsize):
            piece = piece.clone()
        tensors[name] = piece.view(dtype).view(shape)
    return tensors, metadata
