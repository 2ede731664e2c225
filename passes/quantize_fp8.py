"""Quantize the decoder's weight matmuls to FP8, one scale per output channel.

    y = linear(x, W)              ->      y = fp8_linear(x, W8, s, mode)
    y = linear(silu(g) * u, W)    ->      y = fp8_gated_linear(gu, W8, s, mode)   (g, u = split(gu))
                                          W8 = round_e4m3(W / s),  s = max|W[row]| / 448

A matmul whose input is the MLP's activation (down_proj) takes the activation's operands instead,
so that on the GPU the weight-only kernel computes it as it reads its input, and a decode step
runs no kernel for it (kernels/fp8_linear.py: fp8_gated_linear).

Runs after the fusions, so it quantizes the fused qkv_proj and gate_up_proj weights (each row's
scale is its own, so fusing first loses nothing). The fp8 weight keeps the weight's name and the
scale is `<module>.weight_scale`, as in compressed-tensors' FP8 checkpoints. The LM head stays in
the model dtype unless the build asks for `fp8_lm_head`, a weight that something besides the
matmul reads (an LM head tied to the embedding) is never quantized, and the build's `fp8_ignore`
patterns keep the matmuls they name in the model dtype (a small model's MLP gate/up, say: on
SmolLM2 they carry most of the loss, docs/fp8.md).

The matmuls of such a checkpoint arrive as fp8_linear already (compiler/model.py, fused by the
fusions like any other) and keep their weights as stored: the pass only chooses their mode, as for
the weights it quantizes, and its record counts them as `from_checkpoint`.

Which way each matmul computes (kernels/fp8_linear.py: weight-only, or per-token FP8 activations
through `_scaled_mm` with row-wise or output-applied scales) is chosen per weight shape and step
size; a --tp build's shapes are one rank's, as its kernels will see them (the pass runs before
sharding). The GPU target times every mode on the building GPU (kernels/fp8_timing.py) at the
steps of TIMED_ROWS tokens and gives each band of STEP_BANDS the fastest mode at its steps;
adjacent bands with one mode merge, and a shape with more than one band gets a `torch.cond` on the
step's token count per boundary (ProgramEditor.route_by_rows), nested:

    y = cond(rows <= 16, fp8_linear(x, W8, s, "weight_only"),
             cond(rows <= 128, fp8_linear(x, W8, s, "per_token_epilogue"), fp8_linear(x, W8, s, "per_token")))

Why bands and not one boundary: the fastest mode changes more than once with the step size. On
an H200 (docs/fp8.md, session 22) down_proj took weight-only up to 16 rows (17.5 us at one),
output-applied scales at 32 and 128 rows (30.5 and 36.7 us, against 42.7 and 43.0 row-wise), and
row-wise scales at 2048 (212 us against 323).

On the CPU target speed is not the aim and the weight-only form is the accurate one, so it is
taken everywhere. The choices and the timings go to the manifest's `quantization` section.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass matches and emits)
from llama_aot.artifacts.errors import ConfigError
from llama_aot.kernels.decode_linear import FP8_MAX_ROWS, MAX_ROWS
from llama_aot.kernels.fp8_linear import FP8, WEIGHT_ONLY, quantize_rows
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import is_call, linear_weight_name, silu_times_source
from llama_aot.passes.program import DECODER_PREFIX, LM_HEAD, ProgramEditor, weight_scale_name
from llama_aot.passes.shard_tensor_parallel import rank_weight_shape

aten = torch.ops.aten
fp8_linear = torch.ops.llama_aot.fp8_linear.default
fp8_gated_linear = torch.ops.llama_aot.fp8_gated_linear.default


# The bands of step sizes that may each take their own mode, as (the band's largest step, None for
# every larger one; the step sizes its mode is timed at): decode batches within each of the
# weight-only kernel's two row tiles, a full-width decode batch, and a prefill chunk.
STEP_BANDS = ((MAX_ROWS, (1, MAX_ROWS)), (FP8_MAX_ROWS, (FP8_MAX_ROWS,)), (128, (128,)), (None, (2048,)))
TIMED_ROWS = tuple(rows for _, band_rows in STEP_BANDS for rows in band_rows)
SCALED_MM_MULTIPLE = 16


@dataclass(frozen=True)
class ModeChoice:
    """How a matmul of one weight shape computes, by step size: `bands` is ((max_rows, mode), ...)
    with max_rows increasing, the last None (every larger step); `timings_us` (us by step rows, then
    by mode) what the choice was made from."""

    bands: tuple[tuple[int | None, str], ...]
    timings_us: dict = field(default_factory=dict)

    @classmethod
    def everywhere(cls, mode: str) -> "ModeChoice":
        return cls(((None, mode),))

    def describe(self) -> dict[str, str]:
        """The manifest's record: the mode by band of step sizes."""
        if len(self.bands) == 1:
            return {"every step": self.bands[0][1]}
        described, low = {}, 1
        for max_rows, mode in self.bands:
            steps = (f"<= {max_rows}" if low == 1 else f"{low}-{max_rows}") if max_rows else f"> {low - 1}"
            described[f"steps of {steps} tokens"] = mode
            low = (max_rows or 0) + 1
        return described


def choose_modes(ctx: PassContext, shape: tuple[int, int]) -> ModeChoice:
    """See the module docstring: the fastest mode by timing on the GPU target, weight-only on CPU."""
    if ctx.target != "cuda":
        return ModeChoice.everywhere(WEIGHT_ONLY)
    if any(d % SCALED_MM_MULTIPLE for d in shape):
        raise ConfigError(f"--fp8: a matmul with weight shape {shape[0]}x{shape[1]} cannot take FP8 on the GPU "
                          f"(cuBLASLt's FP8 kernels need both dimensions to be multiples of {SCALED_MM_MULTIPLE}); "
                          "keep it in the model dtype with --fp8-ignore")
    from llama_aot.artifacts.config import torch_dtype
    from llama_aot.kernels.fp8_timing import candidate_modes, time_modes

    timings = time_modes(shape, torch_dtype(ctx.build.dtype), TIMED_ROWS)
    bands: list[tuple[int | None, str]] = []
    for max_rows, band_rows in STEP_BANDS:
        timed = [m for m in candidate_modes(max(band_rows)) if all(m in timings[r] for r in band_rows)]
        mode = min(timed, key=lambda m: sum(timings[r][m] for r in band_rows))
        if bands and bands[-1][1] == mode:
            bands.pop()  # the band before takes this one's steps too
        bands.append((max_rows, mode))
    return ModeChoice(tuple(bands), {f"rows={r}": t for r, t in timings.items()})


def _quantizable(editor: ProgramEditor, node, ctx: PassContext) -> str | None:
    """The weight's name if `node` is a bias-free matmul by a parameter this build quantizes."""
    name = linear_weight_name(editor, node)
    if name is None:
        return None
    weight = node.args[1]
    wanted = name.startswith(DECODER_PREFIX) or (name == LM_HEAD and ctx.build.fp8_lm_head)
    return name if wanted and len(weight.users) == 1 and not _ignored(name, ctx.build.fp8_ignore) else None


def _ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p[3:], name) if p.startswith("re:") else p in name for p in patterns)


@graph_pass(phase="quantize")
def quantize_fp8(ep, ctx: PassContext) -> PassResult:
    editor = ProgramEditor(ep)
    choices: dict[str, ModeChoice] = {}
    fp8_weights, from_checkpoint = [], 0
    for node in list(editor.graph.nodes):
        if is_call(node, fp8_linear):  # from a pre-quantized checkpoint
            x, weight, scale_node, _ = node.args
            from_checkpoint += 1
        elif (name := _quantizable(editor, node, ctx)) is not None:
            x, weight = node.args
            q, scale = quantize_rows(editor.weight(weight))
            editor.replace_weight(weight, q)
            scale_node = editor.add_weight(weight_scale_name(name), scale)
        else:
            continue
        shape = rank_weight_shape(editor.weight_name(weight), tuple(editor.weight(weight).shape), ctx.world_size)
        choice = choices.setdefault("x".join(map(str, shape)), choose_modes(ctx, shape))
        _emit(editor, node, (x, weight, scale_node), choice, len(fp8_weights))
        fp8_weights.append(editor.weight_name(weight))
    record = {"weights": str(FP8).removeprefix("torch."), "weight_scale": "per output channel",
              "lm_head": LM_HEAD in fp8_weights, "from_checkpoint": from_checkpoint,
              "ignored": list(ctx.build.fp8_ignore),
              "modes_by_weight_shape": {shape: c.describe() for shape, c in choices.items()},
              "chosen_by": (f"timing on the building GPU at steps of {TIMED_ROWS} tokens"
                            if ctx.target == "cuda" else "rule: weight-only on the CPU target (not timed)"),
              "timings_us_by_weight_shape": {shape: c.timings_us for shape, c in choices.items() if c.timings_us}}
    return PassResult(editor.finish(), len(fp8_weights), editor.new_weights, record if fp8_weights else {})


def _emit(editor: ProgramEditor, node, inputs: tuple, choice: ModeChoice, index: int) -> None:
    """Replaces matmul `node` by fp8_linear (fp8_gated_linear where its input is the MLP's
    activation) in the chosen mode, or by conds between the bands' modes."""
    target = fp8_linear
    if (gate_up := silu_times_source(inputs[0])) is not None:
        target, inputs = fp8_gated_linear, (gate_up, *inputs[1:])
    if len(choice.bands) == 1:
        matmul = editor.call(target, (*inputs, choice.bands[0][1]), before=node)
        node.replace_all_uses_with(matmul)
        editor.graph.erase_node(node)
        return
    editor.route_by_rows(node, inputs, tuple((max_rows, target, (mode,)) for max_rows, mode in choice.bands),
                         f"fp8_linear_{index}")
