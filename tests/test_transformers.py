"""HuggingFace transformers layers and torch.nn transformer layers (issue 16).

Tiny configs built in code (hidden 32, 2 layers), no download.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn

import regsurgery as rs
from regsurgery.analysis.residual import residual_report
from regsurgery.capture.model import capture_model
from regsurgery.ops import DropPath, drop_path
from regsurgery.rewrite.check import PatchCheckError

transformers = pytest.importorskip("transformers")
T = transformers

H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 99, (3, 8), generator=torch.Generator().manual_seed(seed))


def _bert():
    return T.BertModel(T.BertConfig(vocab_size=100, **H)), {"input_ids": _ids()}, {"encoder.layer": 2}


def _gpt2():
    cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg), {"input_ids": _ids(), "use_cache": False}, {"transformer.h": 2}


def _llama():
    cfg = T.LlamaConfig(vocab_size=100, num_key_value_heads=2, **H)
    return T.LlamaForCausalLM(cfg), {"input_ids": _ids(), "use_cache": False}, {"model.layers": 2}


def _t5():
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    ex = {"input_ids": _ids(), "decoder_input_ids": _ids(1), "use_cache": False}
    return T.T5Model(cfg), ex, {"encoder.block": 2, "decoder.block": 3}


def _vit():
    cfg = T.ViTConfig(image_size=32, patch_size=8, **H)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return T.ViTModel(cfg), {"pixel_values": x}, {"layers": 2}


def _wav2vec2():
    cfg = T.Wav2Vec2Config(conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=2, **H)
    x = torch.randn(3, 400, generator=torch.Generator().manual_seed(0))
    return T.Wav2Vec2Model(cfg), {"input_values": x}, {"encoder.layers": 2}


FAMILIES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5, "vit": _vit, "wav2vec2": _wav2vec2}


def _layer_of(scope: str, prefixes) -> str | None:
    for prefix in prefixes:
        if scope.startswith(prefix + "."):
            index = scope[len(prefix) + 1:].split(".")[0]
            return f"{prefix}.{index}"
    return None


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_sites_per_layer_eval_exact_train_stochastic(family):
    torch.manual_seed(0)
    model, ex, per_layer = FAMILIES[family]()
    model.eval()
    report = residual_report(capture_model(model, ex))
    counts = collections.Counter(_layer_of(s.scope, per_layer) for s in report.sites)
    layers = {k: v for k, v in counts.items() if k is not None}
    assert None not in counts, counts  # every site lies in a layer
    for prefix, n in per_layer.items():
        got = [layers.get(f"{prefix}.{i}", 0) for i in range(2)]
        assert got == [n, n], (family, prefix, layers)
    # Both residuals of one layer share a depth.
    depths = collections.defaultdict(set)
    for s in report.sites:
        depths[_layer_of(s.scope, per_layer)].add(s.depth)
    assert all(len(d) == 1 for d in depths.values())

    keys = list(model.state_dict())
    ref = _first(model(**ex))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rs.apply_stochastic_depth(model, rate=0.5, schedule="uniform", example_inputs=ex)
    assert list(model.state_dict()) == keys
    assert torch.equal(_first(model(**ex)), ref)  # eval: the class forward, bitwise
    model.train()
    a, b = _first(model(**ex)), _first(model(**ex))
    assert not torch.allclose(a, b)
    a.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    rs.strip(model)
    model.eval()
    assert torch.equal(_first(model(**ex)), ref)
    assert list(model.state_dict()) == keys


def test_hf_dummy_inputs():
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=100, **H)).eval()
    rs.apply_stochastic_depth(model, rate=0.2)  # no example: the model's dummy_inputs
    assert len(rs.inserted_modules(model)) == 4


class _Options:
    flag = True


class _ObjectArgBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, options):
        if options.flag:
            x = x * 2
        return x + self.g(torch.relu(self.f(x)))


class _ObjectArgNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.odd = _ObjectArgBlock()
        self.plain = _MaskBlock()

    def forward(self, x):
        return self.plain(self.odd(x, _Options()))


def test_uncaptured_blocks_named_in_warning_and_report():
    net, x = _ObjectArgNet(), torch.randn(4, 5, 16)
    report = residual_report(capture_model(net, x))
    assert [f.scope for f in report.skipped] == ["odd"]
    assert "_Options" in report.skipped[0].reason
    with pytest.warns(UserWarning, match=r"could not be captured .*odd"):
        rs.apply_stochastic_depth(net, rate=0.2, example_inputs=x)
    assert list(rs.inserted_modules(net)) == ["plain.regsurgery.dp0"]


def test_hf_generate_and_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model, ex, _ = _gpt2()
    model.eval()
    prompt = ex["input_ids"][:1, :4]
    ref = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rs.apply_stochastic_depth(model, rate=0.3, example_inputs=ex)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), ref)
    model.save_pretrained(tmp_path)
    loaded = T.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert not rs.is_patched(loaded)
    assert torch.equal(loaded(**ex).logits, model(**ex).logits)


def _saved_bytes(model, ex) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _first(model(**ex)).sum().backward()
    return total


def test_hf_gradient_checkpointing_stays_in_force():
    torch.manual_seed(0)
    model, ex, _ = _bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rs.apply_stochastic_depth(model, rate=0.3, example_inputs=ex)
    model.train()
    plain = _saved_bytes(model, ex)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = _saved_bytes(model, ex)
    assert checkpointed < plain * 0.6, (checkpointed, plain)


def test_torch_checkpoint_around_patched_block():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                [nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0) for _ in range(2)])
            self.checkpointing = False

        def forward(self, x):
            for m in self.layers:
                x = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False) if self.checkpointing else m(x)
            return x

    net, x = Net(), torch.randn(3, 5, 32)
    rs.apply_stochastic_depth(net, rate=0.3, example_inputs=x)
    assert len(rs.inserted_modules(net)) == 4
    net.train()

    def saved() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x.clone().requires_grad_()).sum().backward()
        return total

    plain = saved()
    net.checkpointing = True
    checkpointed = saved()
    assert checkpointed < plain * 0.6, (checkpointed, plain)


# ----------------------------------------------------------------------------- torch.nn transformers


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_nn_transformer_layers_all_sites_per_sample(norm_first, batch_first):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
        32, 2, 64, batch_first=batch_first, norm_first=norm_first, dropout=0.0), 2, enable_nested_tensor=False)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(
        32, 2, 64, batch_first=batch_first, norm_first=norm_first, dropout=0.0), 2)
    x = torch.randn(6, 5, 32)
    for model, ex, n in ((enc, x, 4), (dec, (x, x), 6)):
        model.eval()
        ref = model(*ex) if isinstance(ex, tuple) else model(ex)
        rs.apply_stochastic_depth(model, rate=0.5, schedule="uniform", example_inputs=ex)
        dps = list(rs.inserted_modules(model).values())
        assert len(dps) == n
        assert {d.batch_dim for d in dps} == {0 if batch_first else 1}
        out = model(*ex) if isinstance(ex, tuple) else model(ex)
        assert torch.equal(out, ref)
        model.train()
        out = model(*ex) if isinstance(ex, tuple) else model(ex)
        out.sum().backward()


def test_batch_dim_given_overrides():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0), 1, enable_nested_tensor=False)
    rs.apply_stochastic_depth(enc, rate=0.5, example_inputs=torch.randn(6, 5, 32), batch_dim=0)
    assert {d.batch_dim for d in rs.inserted_modules(enc).values()} == {0}


@pytest.mark.parametrize("shape,batch_dim", [((7, 4, 8), 1), ((4, 7, 8), 0), ((4, 3, 5, 5), 0), ((4, 5, 5, 3), 0)])
def test_drop_path_decides_per_sample(shape, batch_dim):
    x = torch.ones(shape)
    y = drop_path(x, 0.5, True, batch_dim=batch_dim, generator=torch.Generator().manual_seed(0))
    per_sample = y.movedim(batch_dim, 0).flatten(1)
    assert all(len(set(row.tolist())) == 1 for row in per_sample)  # a whole sample kept or dropped
    assert set(per_sample[:, 0].tolist()) <= {0.0, 2.0}
    module = DropPath(0.5, batch_dim=batch_dim)
    assert "batch_dim" in repr(module) or batch_dim == 0


# ----------------------------------------------------------------------------- optional arguments


class _MaskBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.f, self.g = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, attn_mask=None):
        m = attn_mask.to(x.dtype) if attn_mask is not None else None
        h = self.f(self.norm(x))
        if m is not None:
            h = h * m
        return x + self.g(h)


class _MaskNet(nn.Module):
    def __init__(self, mask_in_train: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_MaskBlock() for _ in range(2)])
        self.mask_in_train = mask_in_train

    def forward(self, x):
        mask = torch.ones_like(x) if self.training and self.mask_in_train else None
        for b in self.blocks:
            x = b(x, attn_mask=mask)
        return x


def test_none_argument_stays_constant():
    torch.manual_seed(0)
    net, x = _MaskNet(), torch.randn(4, 5, 16)
    rs.apply_stochastic_depth(net, rate=0.5, schedule="uniform", example_inputs=x)
    assert len(rs.inserted_modules(net)) == 2
    net.train()
    net(x).sum().backward()  # the "not None" branch is not in the train forward
    with pytest.raises(RuntimeError, match=r"blocks\.0 .*attn_mask"):
        net.blocks[0](x, attn_mask=torch.ones_like(x))  # guarded: another call fails clearly


def test_failing_patched_forward_is_refused_by_name():
    torch.manual_seed(0)
    net, x = _MaskNet(mask_in_train=True), torch.randn(4, 5, 16)
    with pytest.raises(PatchCheckError, match=r"blocks\.0") as info:
        rs.apply_stochastic_depth(net, rate=0.5, example_inputs=x)
    assert info.value.scope == "blocks.0"
    assert not rs.is_patched(net)  # refused: the model is left as it was
    net.train()
    net(x)


# ----------------------------------------------------------------------------- integrations


def test_trainer_callback_steps_rate_schedule(tmp_path):
    from regsurgery.integrations import rate_schedule_callback

    torch.manual_seed(0)
    model, ex, _ = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rs.apply_stochastic_depth(model, rate=0.4, schedule="uniform", example_inputs=ex)
    model.config.use_cache = False  # the layers were captured without a KV cache
    schedule = rs.RateSchedule(model, total_steps=4)
    assert all(m.p == 0 for m in rs.inserted_modules(model).values())

    # The Trainer's own protocol objects (a Trainer needs accelerate, which this env lacks):
    # CallbackHandler dispatches events exactly as Trainer does.
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    handler = CallbackHandler([rate_schedule_callback(schedule)], model, None, None, None)
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1  # a resumed run
    handler.on_train_begin(None, state, control)
    assert schedule.step_count == 1
    assert all(m.p == pytest.approx(0.1) for m in rs.inserted_modules(model).values())
    state.global_step = 2
    handler.on_step_end(None, state, control)
    assert schedule.step_count == 2
    assert all(m.p == pytest.approx(0.2) for m in rs.inserted_modules(model).values())


def test_hf_own_drop_path_slots_reused():
    torch.manual_seed(0)
    cfg = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=0.1)
    model = T.ConvNextModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    slots = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("DropPath")}
    original = {n: m.drop_prob for n, m in slots.items()}
    assert len(slots) == 3  # the first layer (rate 0) has an Identity
    with pytest.warns(UserWarning, match="already has 3 DropPath"):
        rs.apply_stochastic_depth(model, rate=0.3, schedule="uniform", example_inputs={"pixel_values": x})
    assert all(m.drop_prob == pytest.approx(0.3) for m in slots.values())
    assert len(rs.inserted_modules(model)) == 1  # only the layer without a slot gets a new DropPath
    rs.strip(model)
    assert {n: m.drop_prob for n, m in slots.items()} == original


def test_inline_plan_from_json_applies_to_a_fresh_model():
    """A plan names nodes of the inline capture; a fresh model rebuilds it from the plan's spec."""
    torch.manual_seed(0)
    model, ex, _ = _llama()
    plan = rs.plan_stochastic_depth(model, rate=0.5, schedule="uniform", example_inputs=ex)
    text = plan.to_json()
    torch.manual_seed(0)
    fresh, _, _ = _llama()
    fresh.eval()
    ref = fresh(**ex).logits
    rs.apply_plan(fresh, rs.Plan.from_json(text))
    assert len(rs.inserted_modules(fresh)) == 4
    assert torch.equal(fresh(**ex).logits, ref)
    fresh.train()
    assert not torch.allclose(fresh(**ex).logits, fresh(**ex).logits)


def test_hf_patched_model_pickles_and_stays_regularized():
    import pickle

    model, inputs, _ = _bert()
    rs.apply_stochastic_depth(model, rate=0.3, example_inputs=inputs)
    back = pickle.loads(pickle.dumps(model))
    back.train()
    outs = [back(**inputs).last_hidden_state for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    back.eval()
    model.eval()
    assert torch.equal(back(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_cli_takes_a_local_hf_directory(tmp_path, capsys):
    """inspect, patch and export on a save_pretrained directory given as MODEL (a bare path or hf:DIR)."""
    from regsurgery.cli import main

    model = T.BertModel(T.BertConfig(vocab_size=100, **H))
    model.save_pretrained(tmp_path / "bert")
    directory = str(tmp_path / "bert")
    assert main(["inspect", directory, "--drop-path", "0.1", "--format", "json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert len(doc["sites"]) == 2 * model.config.num_hidden_layers
    out = tmp_path / "bert_patched.pt"
    assert main(["patch", f"hf:{directory}", "--drop-path", "0.1", "--out", str(out)]) == 0
    onnx_path = tmp_path / "bert.onnx"
    assert main(["export", str(out), "--onnx", str(onnx_path)]) == 0
    assert onnx_path.exists()
    loaded = rs.load(str(out))
    assert len(rs.inserted_modules(loaded)) == 2 * model.config.num_hidden_layers


def test_plan_file_inline_example_names_no_code(tmp_path):
    """An inline trace_example in a file holds shapes, dtypes and constants; a 'dtype' naming any
    other torch attribute (a function) is refused before anything is built from it."""
    from regsurgery.io.trust import UntrustedFileError, validate_plan_ops
    from regsurgery.plan import PLAN_FORMAT

    def plan_with(desc):
        return {"format": PLAN_FORMAT, "meta": {}, "ops": [{
            "kind": "drop_path", "scope": "encoder.layer.0", "anchor": "a", "user": "b", "role": "branch",
            "depth": 0, "site": 0, "params": {"p": 0.1, "trace_policy": "inline",
                                              "trace_example": {"inline": {"x": desc}, "npos": 1}}}]}

    validate_plan_ops(plan_with({"shape": [2, 3], "dtype": "float32"}))
    validate_plan_ops(plan_with({"repr": "torch.float16", "kind": "dtype"}))
    for bad in ({"repr": "torch.load", "kind": "dtype"}, {"repr": "os.system", "kind": "device"},
                {"shape": [2], "dtype": "float32", "code": "x"}, {"seq": [{"value": {"a": object}}], "tuple": True}):
        with pytest.raises(UntrustedFileError):
            validate_plan_ops(plan_with(bad))


def test_plan_alone_finds_the_batch_dim_of_sequence_first_layers():
    """plan_stochastic_depth without a capture of its own makes one and uses it for the batch dim."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=False, dropout=0.0), 2,
                                enable_nested_tensor=False)
    plan = rs.plan_stochastic_depth(enc, rate=0.5, example_inputs=torch.randn(6, 5, 32))
    assert [op.params.batch_dim for op in plan.ops] == [1, 1, 1, 1]


def test_dropblock_takes_keyword_example_inputs():
    """apply_dropblock / find_conv_stages take the HF way of calling a model: a dict of keyword arguments."""
    torch.manual_seed(0)
    model = T.ConvNextModel(T.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64])).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = model(pixel_values=x).last_hidden_state
    stages = rs.find_conv_stages(model, {"pixel_values": x})
    assert [s.reduction for s in stages][-2:] == [16, 32]
    rs.apply_dropblock(model, rate=0.3, block_size=3, example_inputs={"pixel_values": x})
    assert any(isinstance(m, rs.DropBlock2d) for m in rs.inserted_modules(model).values())
    assert torch.equal(model(pixel_values=x).last_hidden_state, ref)  # eval untouched
    model.train()
    outs = [model(pixel_values=x).last_hidden_state for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(TypeError, match="pixel_valuez"):
        rs.find_conv_stages(model, {"pixel_valuez": x})
