"""Python code from an fx graph: the generated function, with its source kept for tracebacks."""

from __future__ import annotations

import itertools
import linecache
from typing import Any, Callable

import torch.fx as fx

__all__ = ["compile_graph"]

_counter = itertools.count()


def compile_graph(graph: fx.Graph, label: str) -> tuple[Callable[..., Any], str]:
    """``(forward, source)``: the graph's code as a function ``forward(self, ...)``. The source is
    registered under a unique file name so that tracebacks and debuggers show the generated lines."""
    code = graph.python_code(root_module="self")
    filename = f"<regsurgery {label} #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx-generated code
    return namespace["forward"], code.src
