"""Shard the decoder across `--tp` ranks (Megatron-style): each rank keeps 1/tp of the attention
heads and of the MLP, and of the LM head's vocabulary.

    qkv = linear(x, Wqkv)                        qkv = linear(x, Wqkv[rank's q, k and v heads])
    ... attention over H heads ...        ->     ... attention over H/tp heads (cache: KV/tp heads) ...
    y = linear(a, Wo)                            y = wait(all_reduce(linear(a, Wo[:, rank's columns])))

    gu = linear(x, Wgate_up)                     gu = linear(x, Wgate_up[rank's gate rows, rank's up rows])
    y = linear(silu(g) * u, Wdown)        ->     y = wait(all_reduce(linear(silu(g) * u, Wdown[:, rank's columns])))

    logits = linear(h, Wlm)                      logits = gather_vocab(linear(h, Wlm[rank's vocab rows]))

Column-parallel matmuls (q, k, v, gate, up, fused or not) keep their input whole and split their
output columns; a fused weight is cut segment by segment (the q, k and v parts; gate and up), as
the split after it says. Row-parallel ones (o, down) take the rank's slice of their input and sum
their partial products with an all-reduce, so the residual stream and the norms stay whole on every
rank. An FP8 weight's per-row scales go with its rows; a row-parallel weight keeps them all, since
its rows stay whole. The LM head splits by vocabulary (when tp divides it) and the ranks' logits
are gathered; an LM head tied to the embedding gets its own sharded copy, the embedding stays whole.

Between a column-parallel matmul and the row-parallel one that consumes it, every op sees 1/tp of
its heads or columns: the pass follows that data flow and rewrites the shapes the graph spells out
(split sizes, views over heads), and the KV-cache input keeps KV/tp heads. An op on that path it
does not know stops the pass by name, rather than sharding it wrong. Collectives name TP_GROUP
(artifacts/tensor_parallel.py); the program is the same for every rank, only the weights differ.
"""
from __future__ import annotations

import operator

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Node

import llama_aot.kernels.ops  # noqa: F401  (registers the ops this pass follows)
from llama_aot.artifacts.errors import ConfigError
from llama_aot.artifacts.tensor_parallel import TP_GROUP
from llama_aot.passes.graph_pass import PassContext, PassResult, graph_pass
from llama_aot.passes.matching import is_call
from llama_aot.passes.program import LM_HEAD, ProgramEditor, weight_scale_name

aten = torch.ops.aten
llama = torch.ops.llama_aot
c10d = torch.ops._c10d_functional
COLUMN_PARALLEL = ("qkv_proj", "q_proj", "k_proj", "v_proj", "gate_up_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
KV_CACHE_HEADS_DIM = 4  # [layers, 2, blocks, block_size, kv_heads, head_dim]
_MATMULS = (aten.linear.default, llama.fp8_linear.default, llama.fp8_gated_linear.default)
# Ops that act on each head or column alone: the shard passes through them unchanged.
_ELEMENTWISE = (aten.silu.default, aten.mul.Tensor, aten.to.dtype, aten._to_copy.default)
# Attention ops whose query (and cache) are sharded by heads; their output keeps the heads dim.
_BY_HEADS = (llama.rope_write_kv.default, llama.paged_attention.default)


def rank_weight_shape(name: str, shape: tuple[int, int], tp: int) -> tuple[int, int]:
    """The shape of one rank's part of the matmul weight `name`: 1/tp of the rows of a
    column-parallel weight and of the LM head, of the columns of a row-parallel one (what the
    quantize pass, which runs before sharding, times its kernels at)."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    if (module in COLUMN_PARALLEL or name == LM_HEAD) and shape[0] % tp == 0:
        return shape[0] // tp, shape[1]
    if module in ROW_PARALLEL and shape[1] % tp == 0:
        return shape[0], shape[1] // tp
    return shape


@graph_pass(phase="shard")
def shard_tensor_parallel(ep, ctx: PassContext) -> PassResult:
    tp, rank = ctx.world_size, ctx.rank
    editor = ProgramEditor(ep)
    sharded: dict[Node, int] = {}  # node -> the dim it holds 1/tp of
    sharded[_kv_cache(editor, tp)] = KV_CACHE_HEADS_DIM
    column, reduce_after, gather_after = [], [], []
    for node, weight, scale, out in _weight_matmuls(editor):
        name = editor.weight_name(weight)
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if module in COLUMN_PARALLEL:
            segments = _output_segments(editor, out)
            _check_divides(tp, segments, name)
            _shard_rows(editor, weight, scale, segments, tp, rank)
            sharded[out] = out.meta["val"].dim() - 1
            column.append(out)
        elif module in ROW_PARALLEL:
            _check_divides(tp, [editor.weight(weight).shape[1]], name)
            editor.replace_weight(weight, _block(editor.weight(weight), 1, tp, rank))
            reduce_after.append(out)
        elif _is_lm_head(editor, weight) and editor.weight(weight).shape[0] % tp == 0:
            weight, scale = _own_lm_head(editor, node, weight, scale)
            _shard_rows(editor, weight, scale, [editor.weight(weight).shape[0]], tp, rank)
            gather_after.append(out)
    _follow_shards(editor, sharded, tp)
    editor.refresh_values()  # the sharded shapes, before the collectives that make outputs whole again
    for out in reduce_after:
        _all_reduce_after(editor, out)
    for out in gather_after:
        _gather_vocab_after(editor, out, tp)
    record = {"world_size": tp, "column_parallel": len(column), "row_parallel": len(reduce_after),
              "lm_head": "vocab-parallel" if gather_after else "replicated"}
    matches = len(column) + len(reduce_after) + len(gather_after)
    return PassResult(editor.finish(), matches, editor.new_weights, record)


def _weight_matmuls(editor: ProgramEditor):
    """(matmul node, weight, scale or None, the node holding its output) for every matmul by a
    weight: `linear`, `fp8_linear`, or a `cond` between matmul branches (quantize_fp8's routing),
    whose operands are (x, weight, scale)."""
    for node in list(editor.graph.nodes):
        if any(is_call(node, t) for t in _MATMULS):
            operands, out = node.args, node
        elif is_call(node, torch.ops.higher_order.cond):
            operands = node.args[3]
            users = list(node.users)
            if len(users) != 1 or not is_call(users[0], operator.getitem):
                continue
            out = users[0]
        else:
            continue
        if len(operands) < 2 or editor.weight_name(operands[1]) is None:
            continue
        scale = operands[2] if len(operands) > 2 and isinstance(operands[2], Node) \
            and editor.weight_name(operands[2]) is not None else None
        yield node, operands[1], scale, out


def _kv_cache(editor: ProgramEditor, tp: int) -> Node:
    """The cache input, given KV/tp heads (its other dims, the block count among them, unchanged)."""
    node = next(n for n in editor.graph.nodes if n.op == "placeholder" and n.name == "kv_cache")
    val = node.meta["val"]
    heads = val.shape[KV_CACHE_HEADS_DIM]
    if heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the model's {heads} key/value heads; choose a --tp that does")
    shape = list(val.shape)
    shape[KV_CACHE_HEADS_DIM] = heads // tp
    with editor.fake_mode:
        node.meta["val"] = val.new_empty(shape)
    return node


def _output_segments(editor: ProgramEditor, out: Node) -> list[int]:
    """The column blocks of a matmul's output: the sizes of the split along its last dim that
    follows it (a fused q/k/v or gate/up), its two halves where down_proj's fp8_gated_linear
    takes it whole (gate/up), else the whole width."""
    width = out.meta["val"].shape[-1]
    ndim = out.meta["val"].dim()
    for user in out.users:
        if is_call(user, aten.split_with_sizes.default) and user.args[2] % ndim == ndim - 1:
            return list(user.args[1])
        if _gated_matmul(editor, user):
            return [width // 2, width // 2]
    return [width]


def _gated_matmul(editor: ProgramEditor, node: Node) -> bool:
    """Whether `node` is an fp8_gated_linear, or a cond between fp8_gated_linear branches."""
    if is_call(node, torch.ops.higher_order.cond):
        branch = getattr(editor.gm, node.args[1].target)
        return any(is_call(n, llama.fp8_gated_linear.default) for n in branch.graph.nodes)
    return is_call(node, llama.fp8_gated_linear.default)


def _check_divides(tp: int, sizes: list[int], name: str) -> None:
    if any(s % tp for s in sizes):
        raise ConfigError(f"--tp {tp} does not divide {name}'s {'/'.join(map(str, sizes))} columns of heads or "
                          "units; choose a --tp that divides the model's head counts and intermediate size")


def _block(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    size = t.shape[dim] // tp
    return t.narrow(dim, rank * size, size).contiguous()


def _shard_rows(editor: ProgramEditor, weight: Node, scale: Node | None, segments: list[int], tp: int,
                rank: int) -> None:
    """Keeps the rank's block of every segment of the weight's rows, and of its per-row scales."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for size in segments:
            parts.append(_block(t.narrow(0, start, size), 0, tp, rank))
            start += size
        return torch.cat(parts)

    editor.replace_weight(weight, rows(editor.weight(weight)))
    if scale is not None and editor.weight(scale).dim() > 0 and editor.weight(scale).shape[0] == sum(segments):
        editor.replace_weight(scale, rows(editor.weight(scale)))


def _is_lm_head(editor: ProgramEditor, weight: Node) -> bool:
    name = editor.weight_name(weight)
    return name == LM_HEAD or any(is_call(u, aten.embedding.default) for u in weight.users)


def _own_lm_head(editor: ProgramEditor, node: Node, weight: Node, scale: Node | None):
    """An LM head tied to the embedding gets a copy of its own under `lm_head.weight`, to shard."""
    if len(weight.users) == 1:
        return weight, scale
    copy = editor.add_weight(LM_HEAD, editor.weight(weight).clone())
    node.replace_input_with(weight, copy)
    return copy, scale


def _follow_shards(editor: ProgramEditor, sharded: dict[Node, int], tp: int) -> None:
    """Walks the graph in order from the sharded nodes, marking what each op's output holds 1/tp
    of and rewriting the sizes the graph spells out. Stops at row-parallel matmuls (their output
    is whole after the all-reduce) and refuses any op it does not know."""
    for node in editor.graph.nodes:
        if node in sharded or node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if a in sharded]
        if not inputs:
            continue
        dims = {sharded[a] for a in inputs}
        if is_call(node, aten.sym_size.int):
            if node.args[1] == sharded[node.args[0]]:
                raise ConfigError(f"shard_tensor_parallel: {node.name} reads the size of a sharded dim")
            continue
        if any(is_call(node, t) for t in _MATMULS) or is_call(node, torch.ops.higher_order.cond):
            continue  # a row-parallel matmul consumes the shard: its output is summed, not sharded
        if is_call(node, operator.getitem) and node.args[0] in sharded:
            sharded[node] = sharded[node.args[0]]
        elif is_call(node, aten.split_with_sizes.default):
            x, sizes, dim = node.args
            if dim % x.meta["val"].dim() != sharded[x]:
                raise ConfigError(f"shard_tensor_parallel: {node.name} splits across the sharded dim")
            node.args = (x, [s // tp for s in sizes], dim)
            sharded[node] = sharded[x]
        elif is_call(node, aten.view.default) or is_call(node, aten.reshape.default):
            x, shape = node.args
            new_shape, dim = _sharded_view(x.meta["val"].shape, list(shape), sharded[x], tp, node.name)
            node.args = (x, new_shape)
            sharded[node] = dim
        elif any(is_call(node, t) for t in _ELEMENTWISE) and len(dims) == 1:
            sharded[node] = dims.pop()
        elif any(is_call(node, t) for t in _BY_HEADS):
            sharded[node] = 1
        else:
            raise ConfigError(f"shard_tensor_parallel: does not know how to shard {node.target} ({node.name}) "
                              "between a column-parallel matmul and a row-parallel one")


def _sharded_view(old: torch.Size, shape: list, dim: int, tp: int, name: str) -> tuple[list, int]:
    """The view's target shape for an input holding 1/tp of dim `dim`, whose leading dims the view
    keeps: dim `dim` of the output, the outer dim of the group it splits or merges ([T, H*D] <->
    [T, H, D]), holds the shard."""
    kept = all(not isinstance(a, int) or a == b for a, b in zip(shape[:dim], old[:dim]))
    size = shape[dim] if len(shape) > dim else None
    if not kept or not isinstance(size, int) or size % tp:
        raise ConfigError(f"shard_tensor_parallel: cannot shard view {name} ({list(shape)}) by {tp}")
    return [*shape[:dim], size // tp, *shape[dim + 1:]], dim


def _all_reduce_after(editor: ProgramEditor, out: Node) -> None:
    """Sums the ranks' partial products: y -> wait(all_reduce(y)) for every user of y."""
    users = list(out.users)
    anchor = out.next
    reduced = editor.call(c10d.all_reduce.default, (out, "sum", TP_GROUP), before=anchor)
    waited = editor.call(c10d.wait_tensor.default, (reduced,), before=anchor)
    for user in users:
        user.replace_input_with(out, waited)


def _gather_vocab_after(editor: ProgramEditor, out: Node, tp: int) -> None:
    """[rows, V/tp] per rank -> [rows, V] on every rank: an all-gather stacks the ranks' blocks
    along dim 0 ([tp * rows, V/tp]), and a transpose puts each rank's block in its columns."""
    users = list(out.users)
    anchor = out.next
    rows = editor.call(aten.sym_size.int, (out, 0), before=anchor)
    width = out.meta["val"].shape[-1]
    gathered = editor.call(c10d.all_gather_into_tensor.default, (out, tp, TP_GROUP), before=anchor)
    waited = editor.call(c10d.wait_tensor.default, (gathered,), before=anchor)
    blocks = editor.call(aten.view.default, (waited, [tp, rows, width]), before=anchor)
    by_row = editor.call(aten.permute.default, (blocks, [1, 0, 2]), before=anchor)
    dense = editor.call(aten.clone.default, (by_row,), before=anchor, kwargs={"memory_format": torch.contiguous_format})
    logits = editor.call(aten.view.default, (dense, [rows, tp * width]), before=anchor)
    for user in users:
        user.replace_input_with(out, logits)
