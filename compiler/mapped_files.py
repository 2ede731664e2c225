"""Checkpoint files mapped into memory, and giving back the pages a build has finished reading.

A weight stored in the build's dtype is a zero-copy view of its mapped file (compiler/checkpoint.py).
Reading it makes its pages resident, and they count in the build's memory until the file is
unmapped, so a build that reads every weight once (the reference run, writing each rank's weights)
would end up holding the whole checkpoint although it needs one layer or one shard at a time.
`release_pages` drops the pages under such views (MADV_DONTNEED). The mappings are private
(ACCESS_COPY) and the build never writes into them, so a later read faults the pages in again from
the file, usually from the page cache, which is the kernel's to reclaim and not the build's.
Tensors that are not views of a mapped file are left alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

PAGE = mmap.PAGESIZE
# (mapping, its first byte's address, its length) for every mapping alive; a view keeps its
# mapping alive, so a view's address is found here for as long as the view exists.
_MAPPED: list[tuple[weakref.ref, int, int]] = []


def map_file(path: Path) -> mmap.mmap:
    """`path` mapped privately, whole, and registered for release_pages."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor  # a live export would stop the mapping from ever closing
    _MAPPED[:] = [entry for entry in _MAPPED if entry[0]() is not None]
    _MAPPED.append((weakref.ref(mm), base, len(mm)))
    return mm


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Drops the resident pages under each tensor's storage where that is part of a mapped file
    (whole pages: a page it shares with a neighbouring tensor is dropped too, which costs that
    neighbour a re-read, never its data)."""
    for t in tensors:
        if t.device.type != "cpu" or t.untyped_storage().nbytes() == 0:
            continue
        start = t.untyped_storage().data_ptr()
        end = start + t.untyped_storage().nbytes()
        for ref, base, length in _MAPPED:
            mm = ref()
            if mm is not None and base <= start < base + length:
                first = (start - base) // PAGE * PAGE
                last = min(length, -(-(end - base) // PAGE) * PAGE)
                if last > first:
                    mm.madvise(mmap.MADV_DONTNEED, first, last - first)
                break


@contextlib.contextmanager
def released_after_each_module(model: torch.nn.Module):
    """While open, every submodule that holds weights drops their pages when its forward returns,
    so running `model` holds about one layer's checkpoint pages, not the checkpoint's: how the
    build runs its eager reference (compiler/verify.py) and calibrates, whatever the model's size.
    (The submodules of an exported program's GraphModule never run their own forward; its
    weights are the build's own computed tensors, not checkpoint pages.)"""
    handles = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            handles.append(module.register_forward_hook(lambda *_, own=own: release_pages(own)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
