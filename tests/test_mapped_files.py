"""A build gives back the checkpoint pages it has read (compiler/mapped_files.py): what keeps a
--tp build's memory near one rank's weights (bench/build_memory.py measures the whole build)."""
from pathlib import Path

import torch

from llama_aot.compiler.mapped_files import map_file, release_pages, released_after_each_module

MIB = 1 << 20


def resident_file_mib() -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


def mapped_tensor(tmp_path, mib=64) -> torch.Tensor:
    path = tmp_path / "weights.bin"
    torch.arange(mib * MIB // 4, dtype=torch.float32).numpy().tofile(path)
    return torch.frombuffer(map_file(path), dtype=torch.float32)


def test_read_pages_are_given_back_and_the_values_stay(tmp_path):
    t = mapped_tensor(tmp_path)
    before = resident_file_mib()
    total = t.sum().item()  # reads every page
    assert resident_file_mib() - before > 56
    release_pages([t])
    assert resident_file_mib() - before < 8
    assert t.sum().item() == total and t[12345].item() == 12345.0  # read again from the file


def test_a_tensor_that_is_not_mapped_is_left_alone():
    t = torch.arange(1 << 20, dtype=torch.float32)
    release_pages([t, t[10:], torch.empty(0)])
    assert torch.equal(t, torch.arange(1 << 20, dtype=torch.float32))


def test_a_module_gives_back_its_weights_after_each_forward(tmp_path):
    weight = mapped_tensor(tmp_path).reshape(4096, -1)[:, :1024]
    linear = torch.nn.Linear(1024, 4096, bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    model = torch.nn.Sequential(linear)
    before = resident_file_mib()
    with released_after_each_module(model), torch.no_grad():
        y = model(torch.ones(1, 1024))
    assert resident_file_mib() - before < 8
    assert torch.equal(y, torch.ones(1, 1024) @ weight.T)
    assert not linear._forward_hooks  # the hooks go when the block ends
