"""Stacks of repeated residual layers, for LayerDrop and layer pruning: a pure analysis.

A *stack* is an ``nn.ModuleList`` or ``nn.Sequential`` whose children are blocks of one class. A
block of a stack is *droppable* (it can be skipped in training or pruned away) when

* one recorded forward (:func:`regsurgery.capture.examples.record_module_shapes`) shows it was
  called with an output of the shape of its input, and
* its fx graph is residual on its first input: the output is ``x + something`` (a chain of adds
  whose identity operand is the block's first argument). Then skipping it is the identity
  shortcut of the sum, and the next block receives a value of the kind it was trained on.

Post-norm blocks (``norm(x + f(x))``), blocks that change the width, and blocks that do not trace
are not droppable; the stack lists them with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ..capture.examples import record_module_shapes
from ..capture.fx import qualified, require_module, trace_block

__all__ = ["LayerStack", "find_layer_stacks", "is_residual_on_input"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass
class LayerStack:
    """A container of same-class blocks. ``droppable`` are indices of blocks that may be skipped or
    pruned; ``refused`` maps the other indices to the reason."""

    scope: str
    container: str  # "ModuleList" or "Sequential"
    block_type: str
    size: int
    droppable: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)

    def block_scope(self, index: int) -> str:
        return qualified(self.scope, str(index))


def _add_operands(node: fx.Node) -> Optional[tuple[Any, Any]]:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1]
    if node.op == "call_method" and node.target in _ADD_METHODS and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1]
    return None


def is_residual_on_input(graph: fx.Graph) -> bool:
    """Is the graph's output ``x + ...`` for its first placeholder ``x``, through adds only?"""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if not placeholders or out is None or not isinstance(out.args[0], fx.Node):
        return False
    x = placeholders[0]

    def reaches(v: Any, depth: int = 0) -> bool:
        if not isinstance(v, fx.Node) or depth > 256:
            return False
        operands = _add_operands(v)
        if operands is None:
            return False
        return any(a is x or reaches(a, depth + 1) for a in operands)

    return reaches(out.args[0])


def find_layer_stacks(model: nn.Module, example_inputs: Any = None) -> list[LayerStack]:
    """Every stack of same-class blocks in ``model``, with its droppable blocks (see module doc).

    ``example_inputs`` feeds the one recorded forward (inferred from the model when None). The
    model is not modified.
    """
    require_module(model)
    candidates = []
    for scope, m in model.named_modules():
        if type(m) not in (nn.ModuleList, nn.Sequential) or len(m) < 2:
            continue
        kinds = {type(c) for c in m.children()}
        if len(kinds) != 1 or len(list(m.children())) != len(m._modules):
            continue
        if not all(k.isdigit() for k in m._modules):
            continue
        candidates.append((scope, m))
    if not candidates:
        return []
    shapes: dict[str, tuple[Any, Any]] = {}
    for call in record_module_shapes(model, example_inputs):
        shapes.setdefault(call.name, (call.input_shape, call.output_shape))
    stacks = []
    for scope, m in candidates:
        stack = LayerStack(scope=scope, container=type(m).__name__, block_type=type(next(iter(m.children()))).__name__,
                           size=len(m))
        for i, block in enumerate(m.children()):
            name = qualified(scope, str(i))
            if name not in shapes:
                stack.refused[i] = "not called in the recorded forward"
                continue
            shape_in, shape_out = shapes[name]
            if shape_in is None or shape_in != shape_out:
                stack.refused[i] = f"output shape {shape_out} differs from input shape {shape_in}"
                continue
            try:
                graph = trace_block(block, name).graph
            except Exception as exc:
                stack.refused[i] = f"does not trace ({type(exc).__name__})"
                continue
            if not is_residual_on_input(graph):
                stack.refused[i] = "output is not its first input plus a branch (not residual)"
                continue
            stack.droppable.append(i)
        stacks.append(stack)
    return stacks
