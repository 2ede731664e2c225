"""The build's verdict on a compiled program (compiler/verify.py's compare), on synthetic logits:
a reduced-precision build is held to the fixed tolerance, or, measured against the float32 model,
to how far rounding to its dtype moves the logits by itself, and no further."""
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.compiler.verify import Schedule, compare


def _rows(seed: int, noise: float, base: torch.Tensor) -> torch.Tensor:
    return base + noise * torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))


def _schedule(eager: torch.Tensor, plain: list[torch.Tensor]) -> Schedule:
    return Schedule(prompts=1, steps=[], num_blocks=0, eager_rows=[eager], plain_rows=plain,
                    plain_model="the float32 model")


def test_a_difference_within_the_dtypes_own_rounding_passes_and_one_beyond_it_fails():
    float32 = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    float32[torch.arange(64), torch.arange(64)] += 20  # a clear greedy choice in every row
    eager = _rows(1, 1.0, float32)  # the bfloat16 model: ~0.15 from float32 on compare's measure
    compiled = _rows(2, 0.5, eager)  # twice the fixed bfloat16 tolerance from the eager model
    build = BuildConfig(dtype="bfloat16")

    alone = compare(_schedule(eager, []), [compiled], build)
    assert not alone["passed"] and alone["relative_error"] > 5e-2

    measured = compare(_schedule(eager, [float32]), [compiled], build)
    assert measured["passed"]
    gap = measured["reference_gap"]
    assert gap["against"] == "the float32 model" and gap["relative_error"] > measured["relative_error"]
    assert measured["tolerance"]["relative_error"] == gap["relative_error"]

    wrong = _rows(3, 4.0, eager)  # farther from the eager model than the dtype moves it
    assert not compare(_schedule(eager, [float32]), [wrong], build)["passed"]
