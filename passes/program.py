"""Editing an ExportedProgram's graph and its weights together.

An exported program keeps its parameters in three places that must agree: placeholder nodes in
the graph, input specs in the graph signature, and tensors in the state dict. Passes that change
weights (fusing matmuls, quantizing, sharding) go through `ProgramEditor`, which keeps the three
consistent and drops weights no node uses any more, so that no pass can emit a program whose
signature names a weight the artifact lacks. `new_weights` holds the weights the edit added or
changed (a pass result's `weights`).
"""
from __future__ import annotations

import copy
import operator

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.fx import Graph, GraphModule, Node

import llama_aot.kernels.ops  # noqa: F401  (registers the fp8_linear op that fuse_linears fuses)

aten = torch.ops.aten
# The matmuls `target(x, <per-output-row tensors>, <options>)` that fuse_linears fuses, with how many
# per-row tensors each takes: the weight, and for fp8_linear the weight's scale.
ROW_OPERANDS = {aten.linear.default: 1, torch.ops.llama_aot.fp8_linear.default: 2}


# The checkpoint's parameter names the passes choose matmuls by.
DECODER_PREFIX = "model.layers."
LM_HEAD = "lm_head.weight"


def weight_scale_name(weight: str) -> str:
    """`<module>.weight_scale` for `<module>.weight`, as in compressed-tensors' FP8 checkpoints."""
    return weight.removesuffix("weight") + "weight_scale"


class ProgramEditor:
    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.gm = copy.deepcopy(ep.graph_module)
        self.graph = self.gm.graph
        self.state_dict = dict(ep.state_dict)
        sig = ep.graph_signature
        self._specs = {s.arg.name: s for s in sig.input_specs if isinstance(s.arg, TensorArgument)}
        self._placeholders = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        self._fake_mode = detect_fake_mode([n.meta.get("val") for n in self._placeholders.values()])
        self.new_weights: dict[str, torch.Tensor] = {}

    @property
    def fake_mode(self):
        """The program's fake mode, for computing a new node's value as export would have."""
        return self._fake_mode

    def _describe(self, value: torch.Tensor):
        """A placeholder's value: a fake tensor of the weight's layout, never the weight itself
        (which may be a fake the build records ops on, compiler/lazy_weights.py)."""
        with self._fake_mode:
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)

    def weight_name(self, node: Node) -> str | None:
        """The FQN of the parameter `node` stands for, or None if it is not a parameter."""
        if node.op != "placeholder":
            return None
        spec = self._specs.get(node.name)
        return spec.target if spec is not None and spec.kind == InputKind.PARAMETER else None

    def weight(self, node: Node) -> torch.Tensor:
        return self.state_dict[self.weight_name(node)]

    def add_weight(self, name: str, value: torch.Tensor) -> Node:
        """Adds a parameter placeholder (after the existing ones, before user inputs)."""
        if name in self.state_dict:
            raise ValueError(f"weight {name} already exists")
        first_user_input = next(n for n in self.graph.nodes if n.op == "placeholder"
                                and self._specs[n.name].kind == InputKind.USER_INPUT)
        with self.graph.inserting_before(first_user_input):
            node = self.graph.placeholder("p_" + name.replace(".", "_"))
        node.meta["val"] = self._describe(value)
        self.state_dict[name] = torch.nn.Parameter(value, requires_grad=False)
        self.new_weights[name] = self.state_dict[name]
        self._specs[node.name] = InputSpec(InputKind.PARAMETER, TensorArgument(node.name), name)
        return node

    def replace_weight(self, node: Node, value: torch.Tensor) -> None:
        """Gives parameter `node` a new value (another dtype or layout) under the same name; the
        pass rewrites its users to match."""
        name = self.weight_name(node)
        node.meta["val"] = self._describe(value)
        self.state_dict[name] = torch.nn.Parameter(value, requires_grad=False)
        self.new_weights[name] = self.state_dict[name]

    def call(self, target, args: tuple, before: Node, kwargs: dict | None = None) -> Node:
        """Inserts `target(*args, **kwargs)` before `before`, with its fake value, as export would have."""
        kwargs = kwargs or {}
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self._fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def refresh_values(self) -> None:
        """Recomputes every node's fake value from the placeholders' (and each `cond` branch's
        from its operands'), after an edit that changed shapes through the graph, as sharding does."""
        _propagate(self.gm, [n.meta["val"] for n in self.graph.nodes if n.op == "placeholder"], self._fake_mode)

    def fuse_linears(self, linears: list[Node], fused_name: str) -> Node:
        """Replaces sibling matmuls `linear(x, W_i)` by one `linear(x, cat(W_i))` and a split, or
        `fp8_linear(x, W_i, s_i, mode)` by `fp8_linear(x, cat(W_i), cat(s_i), mode)`: each scale
        belongs to its weight's row, so the fused matmul computes exactly what the parts did.

        Each fused tensor is built once, so peak memory is one extra copy of the fused matrices,
        never of the model."""
        x, target = linears[0].args[0], linears[0].target
        names = (fused_name, weight_scale_name(fused_name))[:ROW_OPERANDS[target]]
        fused = [self.add_weight(name, torch.cat([self.weight(n.args[1 + i]) for n in linears], dim=0))
                 for i, name in enumerate(names)]
        sizes = [self.weight(n.args[1]).shape[0] for n in linears]
        first = next(n for n in self.graph.nodes if n in linears)
        out = self.call(target, (x, *fused, *linears[0].args[1 + len(names):]), before=first)
        parts = self.call(aten.split_with_sizes.default, (out, sizes, -1), before=first)
        for i, old in enumerate(linears):
            piece = self.call(operator.getitem, (parts, i), before=first)
            old.replace_all_uses_with(piece)
            self.graph.erase_node(old)
        return out

    def route_by_rows(self, node: Node, inputs: tuple[Node, ...], branches: tuple, name: str) -> None:
        """Replaces `node` by a choice between calls by the step's token count, `inputs[0].shape[0]`.
        `branches` is `((max_rows, target, constants), ..., (None, target, constants))` with
        max_rows increasing: a step runs the first branch whose max_rows it does not exceed, the
        one call `target(*inputs, *constants)`.

        The exported program has one symbolic token count, so each choice is a `torch.cond` on it,
        the later branches nested in its false branch: AOTInductor compiles every branch and picks
        one per call in its C++ wrapper, with no copy of the result. A CUDA graph records the
        branches of the batch it captured, and decode graphs are captured per batch size."""
        with self.graph.inserting_before(node):
            result = _route(self.gm, self.graph, list(inputs), branches, name, node.meta["val"])
        node.replace_all_uses_with(result)
        self.graph.erase_node(node)

    def finish(self) -> ExportedProgram:
        """Drops dead nodes and unused weights, and rebuilds the signature in placeholder order."""
        self.graph.eliminate_dead_code(is_impure_node=_is_impure)
        for node in list(self.graph.nodes):
            if node.op == "placeholder" and not node.users and self._specs[node.name].kind == InputKind.PARAMETER:
                self.state_dict.pop(self._specs[node.name].target, None)
                self.new_weights.pop(self._specs[node.name].target, None)
                self.graph.erase_node(node)
        self.graph.lint()
        self.gm.recompile()
        specs = [self._specs[n.name] for n in self.graph.nodes if n.op == "placeholder"]
        signature = ExportGraphSignature(input_specs=specs, output_specs=self.ep.graph_signature.output_specs)
        return ExportedProgram(
            root=self.gm, graph=self.graph, graph_signature=signature, state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.ep.range_constraints),
            module_call_graph=copy.deepcopy(self.ep.module_call_graph),
            example_inputs=self.ep.example_inputs, constants=self.ep.constants,
            verifiers=self.ep.verifiers)


def _route(owner: torch.nn.Module, graph: Graph, operands: list[Node], branches: tuple, name: str, value) -> Node:
    """Emits `cond(rows <= max_rows, first branch, the others)` at `graph`'s insertion point, each
    branch a subgraph held by `owner`; returns the node of its result, whose fake value is `value`."""
    (max_rows, target, constants), rest = branches[0], branches[1:]
    small = _branch_graph([(None, target, constants)], operands, name, value)
    large = _branch_graph(rest, operands, name, value)
    names = (f"{name}_rows_le_{max_rows}", f"{name}_rows_gt_{max_rows}")
    for branch_name, branch in zip(names, (small, large)):
        owner.add_module(branch_name, branch)
    rows = graph.call_function(aten.sym_size.int, (operands[0], 0))
    rows.meta["val"] = operands[0].meta["val"].shape[0]
    fits = graph.call_function(operator.le, (rows, max_rows))
    fits.meta["val"] = rows.meta["val"] <= max_rows
    attrs = [graph.get_attr(branch_name) for branch_name in names]
    cond = graph.call_function(torch.ops.higher_order.cond, (fits, *attrs, tuple(operands)))
    cond.meta["val"] = (value,)
    result = graph.call_function(operator.getitem, (cond, 0))
    result.meta["val"] = value
    return result


def _branch_graph(branches: tuple, operands: list[Node], name: str, value) -> GraphModule:
    """A graph `(*operands) -> (result,)`: the one call of a single branch, or the route between several."""
    graph, root = Graph(), torch.nn.Module()
    placeholders = []
    for node in operands:
        placeholder = graph.placeholder(node.name)
        placeholder.meta["val"] = node.meta["val"]
        placeholders.append(placeholder)
    if len(branches) == 1:
        _, target, constants = branches[0]
        out = graph.call_function(target, (*placeholders, *constants))
        out.meta["val"] = value
    else:
        out = _route(root, graph, placeholders, branches, name, value)
    graph.output((out,))
    return GraphModule(root, graph)


def _propagate(gm: GraphModule, inputs: list, fake_mode) -> None:
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*inputs)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
            operands = [n.meta["val"] for n in node.args[3]]
            for branch in node.args[1:3]:
                _propagate(getattr(gm, branch.target), operands, fake_mode)


def _is_impure(node: Node) -> bool:
    """Mutating ops (the KV write) must survive dead-code elimination; metadata asserts on values
    that a rewrite made dead need not."""
    if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
        return False
    return node.is_impure()
