"""Weights that are computed only when they are written: how a build avoids holding every fused,
quantized or sharded copy of the model at once.

The passes and AOTInductor need a weight's shape, dtype and device, not its value. So after export
the build swaps the program's weights for FakeTensors (`LazyWeights(ep)`), and runs the passes
inside `LazyWeights.recording()`: there every op with a fake weight among its inputs (the fusions'
`cat`, quantize_fp8's `amax`/`div`/casts, the shard pass's `narrow`) still runs on fake tensors,
and its output is recorded with a recipe, that op on its inputs' recipes. Writing the artifact
then materializes the program's weights one at a time:

    ep = export_model(model, build)
    lazy = LazyWeights(ep)                                         # ep's weights are fakes now
    with lazy.recording():
        ep, _ = run_pipeline(ep, ctx)                              # weights recorded, not computed
    for name, w in program_constants(ep).items():
        value = lazy.materialize(w)                                # computed now, from the model's

Each materialization holds its weight's inputs and intermediates only: a rank's weights need that
rank's tensors and one layer's sources at a time, never a fused or quantized copy of the model
(and with `release`, the sources' checkpoint pages are given back as soon as each is computed).
Recipes are keyed by the fake tensor's storage and layout, which a detach or an `nn.Parameter`
wrapper keeps; the recorder keeps every recorded tensor alive, so no storage is reused under
another tensor.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map


@dataclass(frozen=True)
class _Recipe:
    """A leaf's real tensor (`source`), or `func(*args, **kwargs)` (its `index`-th output)."""

    source: torch.Tensor | None = None
    func: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    index: int | None = None


@dataclass(frozen=True)
class _Ref:
    """A recorded tensor inside a recipe's arguments."""

    key: tuple


def _storage_key(t) -> tuple | None:
    """Same storage and layout, same values: a detach, an `nn.Parameter` wrapper or a no-op view
    of a recorded tensor is that tensor; a view that selects other elements is not."""
    if not isinstance(t, torch.Tensor) or not all(type(d) is int for d in (*t.shape, *t.stride())):
        return None  # activations have symbolic sizes; weights never do
    return t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


class LazyWeights:
    """Takes over an exported program's weights: `ep.state_dict` then holds fake tensors in the
    program's own fake mode, each recorded with the real tensor it stands for."""

    def __init__(self, ep: ExportedProgram, release: Callable[[list[torch.Tensor]], None] | None = None):
        """`release`, if given, hears of the real tensors each materialization read, once it is done
        with them (the build drops their checkpoint pages: compiler/mapped_files.py)."""
        self._release = release
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"])
        self._recipes: dict[tuple, _Recipe] = {}
        self._alive: list[torch.Tensor] = []
        fakes: dict[int, torch.Tensor] = {}  # names that share one tensor (a tied LM head) share one fake
        for name, real in ep.state_dict.items():
            if id(real) not in fakes:
                fake = self.fake_mode.from_tensor(real, static_shapes=True)
                fakes[id(real)] = self._record(torch.nn.Parameter(fake, requires_grad=False), _Recipe(source=real))
            ep.state_dict[name] = fakes[id(real)]

    def is_lazy(self, t) -> bool:
        key = _storage_key(t)
        return key is not None and key in self._recipes

    @contextlib.contextmanager
    def recording(self):
        """Where the passes run: ops on recorded tensors are recorded."""
        with _Recorder(self):
            yield

    def materialize(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s value as a real, contiguous tensor (`t` itself if it was never recorded)."""
        key = _storage_key(t)
        if key not in self._recipes:
            if isinstance(t, torch._subclasses.FakeTensor):
                raise ValueError("a fake weight with no recipe: a pass made it without an op on recorded weights")
            return t
        memo: dict[tuple, Any] = {}

        def value(k: tuple):
            if k not in memo:
                recipe = self._recipes[k]
                if recipe.source is not None:
                    memo[k] = recipe.source
                else:
                    resolve = lambda a: value(a.key) if isinstance(a, _Ref) else a  # noqa: E731
                    out = recipe.func(*tree_map(resolve, recipe.args), **tree_map(resolve, recipe.kwargs))
                    memo[k] = out if recipe.index is None else out[recipe.index]
            return memo[k]

        with torch.no_grad():
            out = value(key).contiguous()
        if self._release is not None:
            self._release([self._recipes[k].source for k in memo if self._recipes[k].source is not None])
        return out

    def real_module(self, ep) -> torch.nn.Module:
        """`ep.module()` with its weights materialized: the program run eagerly, for verification."""
        module = ep.module()
        state = {k: self.materialize(v) for k, v in module.state_dict(keep_vars=True).items()}
        module.load_state_dict(state, assign=True)
        return module

    def _record(self, fake: torch.Tensor, recipe: _Recipe) -> torch.Tensor:
        """Gives `fake` its recipe, unless it is a recorded tensor already (a detach, say). An
        output with symbolic sizes is an activation (a pass computing a fake value), not a weight."""
        key = _storage_key(fake)
        if key is not None:
            self._recipes.setdefault(key, recipe)
            self._alive.append(fake)
        return fake


class _Recorder(TorchDispatchMode):
    def __init__(self, lazy: LazyWeights):
        super().__init__()
        self.lazy = lazy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(self.lazy.is_lazy(a) for a in tree_leaves((args, kwargs))):
            return out
        if func._schema.is_mutable:
            raise RuntimeError(f"a pass changed a weight in place ({func}); weights must be replaced, not mutated")
        to_ref = lambda a: _Ref(_storage_key(a)) if self.lazy.is_lazy(a) else a  # noqa: E731
        rec_args, rec_kwargs = tree_map(to_ref, args), tree_map(to_ref, kwargs)
        if isinstance(out, torch.Tensor):
            return self.lazy._record(out, _Recipe(func=func, args=rec_args, kwargs=rec_kwargs))
        for i, o in enumerate(out if isinstance(out, (list, tuple)) else ()):  # not a device or a size
            if isinstance(o, torch.Tensor):
                self.lazy._record(o, _Recipe(func=func, args=rec_args, kwargs=rec_kwargs, index=i))
        return out
