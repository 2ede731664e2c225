"""Structural matchers over an exported aten graph, shared by the passes.

They match on what the graph computes (ops, operand roles, data flow), not on node or parameter
names, so a pass keeps matching when export renames nodes; dtype casts that export inserts
between ops are looked through.
"""
from __future__ import annotations

import operator

from collections import defaultdict

import torch
from torch.fx import Node

from llama_aot.passes.program import ROW_OPERANDS, ProgramEditor

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten._to_copy.default)


def is_call(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == target


def linear_weight_name(editor: ProgramEditor, node) -> str | None:
    """The weight parameter's name if `node` is a bias-free `linear(x, W)` by a parameter (what
    the quantize passes rewrite), else None."""
    if not (is_call(node, aten.linear.default) and len(node.args) == 2 and not node.kwargs):
        return None
    return editor.weight_name(node.args[1])


def skip_casts(node: Node) -> Node:
    while isinstance(node, Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def sibling_linears(editor: ProgramEditor) -> list[list[Node]]:
    """Groups of alike matmuls that share their input x, in graph order: bias-free `linear(x, W)`,
    or `fp8_linear(x, W, scale, mode)` of one mode, whose W (and scale) are weights. These are
    what ProgramEditor.fuse_linears fuses."""
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for node in editor.graph.nodes:
        rows = ROW_OPERANDS.get(node.target) if node.op == "call_function" else None
        if rows is None or node.kwargs or (is_call(node, aten.linear.default) and len(node.args) != 2):
            continue  # not a matmul fuse_linears knows, or a linear with a bias
        if all(editor.weight_name(a) is not None for a in node.args[1:1 + rows]):
            groups[(node.args[0], node.target, *node.args[1 + rows:])].append(node)
    return [g for g in groups.values() if len(g) > 1]


def silu_times_source(node: Node) -> Node | None:
    """`gu` if `node` is the MLP's `silu(g) * u` (either operand order) with g, u the two equal
    halves of `split_with_sizes(gu, [I, I], -1)` (fuse_gate_up's output), else None."""
    if not is_call(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for silu, up in (node.args, node.args[::-1]):
        if not (isinstance(silu, Node) and is_call(silu, aten.silu.default) and isinstance(up, Node)):
            continue
        gate = silu.args[0]
        halves = [gate, up]
        if not all(is_call(h, operator.getitem) for h in halves):
            return None
        split = gate.args[0]
        if (up.args[0] is not split or [h.args[1] for h in halves] != [0, 1]
                or not is_call(split, aten.split_with_sizes.default)):
            return None
        src, sizes, dim = split.args
        last = dim % src.meta["val"].dim() == src.meta["val"].dim() - 1
        return src if last and len(sizes) == 2 and sizes[0] == sizes[1] else None
    return None


def reaches(node: Node, targets, max_depth: int = 16) -> bool:
    """Whether `node`'s value flows into a call of one of `targets` within `max_depth` steps."""
    frontier, seen = [node], {node}
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op == "call_function" and user.target in targets:
                    return True
                if user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def common_module(names: list[str]) -> str | None:
    """`model.layers.0.self_attn` for `model.layers.0.self_attn.{q,k,v}_proj.weight`; None when
    the weights do not live in one module."""
    parents = {n.rsplit(".", 2)[0] for n in names}
    return parents.pop() if len(parents) == 1 else None


def match_rms_norm(node: Node, editor: ProgramEditor):
    """Matches `weight * cast(xf * rsqrt(mean(xf ** 2, -1, keepdim) + eps))` with xf = cast(x);
    returns (x, weight_node, eps) or None."""
    if not is_call(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    weight, normed = node.args
    if editor.weight_name(weight) is None:
        weight, normed = normed, weight
    if editor.weight_name(weight) is None or editor.weight(weight).dim() != 1:
        return None
    scaled = skip_casts(normed)
    if not is_call(scaled, aten.mul.Tensor):
        return None
    xf, rsqrt = scaled.args
    if not is_call(rsqrt, aten.rsqrt.default) or not is_call(rsqrt.args[0], aten.add.Tensor):
        return None
    mean, eps = rsqrt.args[0].args
    if not is_call(mean, aten.mean.dim) or not isinstance(eps, float):
        return None
    if list(mean.args[1]) != [-1] or not (len(mean.args) > 2 and mean.args[2]):
        return None
    pow_ = mean.args[0]
    if not is_call(pow_, aten.pow.Tensor_Scalar) or pow_.args[1] != 2 or pow_.args[0] is not xf:
        return None
    return skip_casts(xf), weight, eps
