"""The capture layer: one capture per block, the same graphs with or without a tracing session."""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

import regsurgery
from regsurgery.capture.fx import BlockTracer, TraceFailure, iter_block_graphs, trace_block
from regsurgery.capture.model import capture_model, copy_graph
from regsurgery.capture.session import session_supported, tracing_session


def _code(graph: torch.fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        torchvision.models.resnet18(weights=None),
        timm.create_model("convnext_atto", pretrained=False),
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2),
    ]


def test_session_gives_the_same_graphs_as_plain_tracing():
    assert session_supported()
    for model in _models():
        plain = {i.scope: i for i in iter_block_graphs(model)}
        with tracing_session():
            shared = {i.scope: i for i in iter_block_graphs(model)}
        assert plain.keys() == shared.keys()
        for scope, item in plain.items():
            other = shared[scope]
            assert type(item) is type(other), scope
            if not isinstance(item, TraceFailure):
                assert item.policy == other.policy
                assert _code(item.graph) == _code(other.graph), scope


def test_session_leaves_torch_as_it_found_it():
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    with tracing_session():
        assert nn.Module.__call__ is not call  # routed while the session runs
        assert torch.equal(model(x), before)  # real forwards between traces are unaffected
        trace_block(model.layer1[0], "layer1.0")
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert torch.fx._symbolic_trace.CURRENT_PATCHER is None
    torch.fx.symbolic_trace(model)  # plain fx still works afterwards


def test_session_is_restored_when_a_trace_fails():
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx raises
                return x
            return -x

    call = nn.Module.__call__
    try:
        with tracing_session():
            trace_block(Bad())
    except Exception:
        pass
    assert nn.Module.__call__ is call


def test_one_capture_feeds_analysis_and_rewrite_without_retracing(monkeypatch):
    model = torchvision.models.resnet18(weights=None)
    traced: list[int] = []
    real = BlockTracer.trace

    def counting(self, root, *args, **kwargs):
        traced.append(id(root))
        return real(self, root, *args, **kwargs)

    monkeypatch.setattr(BlockTracer, "trace", counting)
    capture = capture_model(model)
    up_front = len(traced)
    plan = regsurgery.plan_stochastic_depth(model, rate=0.1, capture=capture)
    regsurgery.apply_plan(model, plan, capture=capture)
    # Children the analysis looks into are captured on demand, once; nothing is traced twice.
    assert len(traced) == len(set(traced)) and up_front >= 9
    again = len(traced)
    regsurgery.plan_stochastic_depth(model, rate=0.2, capture=capture)
    assert len(traced) == again  # a second analysis of the same capture traces nothing
    assert len(regsurgery.inserted_modules(model)) == 8
    # the capture itself is not mutated by the rewrite: it still has no inserted node
    for block in capture.blocks:
        assert not any("regsurgery" in str(n.target) for n in block.graph.nodes)


def test_copy_graph_keeps_node_names():
    block = trace_block(torchvision.models.resnet18(weights=None).layer2[0], "layer2.0")
    copied = copy_graph(block.graph)
    assert [n.name for n in copied.nodes] == [n.name for n in block.graph.nodes]
    assert _code(copied) == _code(block.graph)


def test_constant_defaults_are_guarded_not_proxied():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 4)

        def forward(self, x, pre_logits: bool = False):
            if pre_logits:
                return x
            return x + self.fc2(self.fc1(x).relu())

    head = Head()
    block = trace_block(head, "head")
    assert block.policy.endswith("+defaults")
    regsurgery.apply_stochastic_depth(head, rate=0.5)
    head.train()
    x = torch.randn(3, 4)
    head(x)
    head(x, pre_logits=False)  # the real parameter name, by keyword
    try:
        head(x, pre_logits=True)
    except Exception as exc:  # the traced branch does not hold for another value: loud, not silent
        assert "specialized" in str(exc)
    else:
        raise AssertionError("a call with another value than the traced constant must fail")
