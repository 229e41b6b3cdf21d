"""How a block becomes a graph: the fx tracer (leaf policy), example inputs, the block graph."""

from .examples import check_example_input, infer_example_input, record_module_shapes
from .fx import BlockGraph, TraceFailure, iter_block_graphs, trace_block

__all__ = [
    "BlockGraph",
    "TraceFailure",
    "check_example_input",
    "infer_example_input",
    "iter_block_graphs",
    "record_module_shapes",
    "trace_block",
]
