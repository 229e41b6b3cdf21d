"""Residual sites per layer in HuggingFace ``transformers`` families, and P/R/F1 where a model
ships its own DropPath (config ``drop_path_rate``): the ground truth is then the model's own
DropPath modules, and a site is correct when it reuses one (``site.existing``).

Tiny configs built in code (hidden 32, 2 layers per stage), no download.

    OMP_NUM_THREADS=1 python benchmarks/hf_sites.py [--families bert,gpt2]
"""

from __future__ import annotations

import argparse
import collections
import re
import time
import warnings

import torch

from regsurgery.analysis.residual import residual_report
from regsurgery.capture.fx import is_drop_path_slot
from regsurgery.capture.model import capture_model

H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _ids(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 99, (2, n), generator=torch.Generator().manual_seed(0))


def _img(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def families():
    import transformers as T

    text = {"input_ids": _ids()}
    causal = {"input_ids": _ids(), "use_cache": False}
    return {
        "bert": lambda: (T.BertModel(T.BertConfig(vocab_size=100, **H)), text),
        "roberta": lambda: (T.RobertaModel(T.RobertaConfig(vocab_size=100, pad_token_id=1, **H)), text),
        "distilbert": lambda: (T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                     hidden_dim=64)), text),
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                                         bos_token_id=0, eos_token_id=0)), causal),
        "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, **H)), causal),
        "mistral": lambda: (T.MistralForCausalLM(T.MistralConfig(vocab_size=100, num_key_value_heads=2, **H)), causal),
        "qwen2": lambda: (T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=100, num_key_value_heads=2, **H)), causal),
        "t5": lambda: (T.T5Model(T.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                            num_heads=2)),
                       {"input_ids": _ids(), "decoder_input_ids": _ids(), "use_cache": False}),
        "bart": lambda: (T.BartModel(T.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                                  encoder_ffn_dim=64, decoder_ffn_dim=64)),
                         {"input_ids": _ids(), "decoder_input_ids": _ids(), "use_cache": False}),
        "vit": lambda: (T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **H)), {"pixel_values": _img()}),
        "wav2vec2": lambda: (T.Wav2Vec2Model(T.Wav2Vec2Config(conv_dim=(32, 32), conv_stride=(5, 2),
                                                               conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                               num_conv_pos_embedding_groups=2, **H)),
                             {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}),
        # Families with their own DropPath (drop_path_rate > 0 so the modules exist).
        "convnext": lambda: (T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2,
                                                              drop_path_rate=0.1)), {"pixel_values": _img()}),
        "swin": lambda: (T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                  num_heads=[2, 2], window_size=4, drop_path_rate=0.1)),
                         {"pixel_values": _img()}),
        "beit": lambda: (T.BeitModel(T.BeitConfig(image_size=32, patch_size=8, drop_path_rate=0.1,
                                                  use_mask_token=False, **H)), {"pixel_values": _img()}),
        "dinov2": lambda: (T.Dinov2Model(T.Dinov2Config(image_size=32, patch_size=8, drop_path_rate=0.1, **H)),
                           {"pixel_values": _img()}),
    }


def layer_key(scope: str) -> str:
    """A scope up to its last layer index (``encoder.layer.0.attention`` -> ``encoder.layer.0``)."""
    m = re.match(r"(.*\.\d+)(\.|$)", scope)
    parts = scope.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: idx[-1] + 1]) if idx else (m.group(1) if m else scope)


def measure(name: str, build) -> dict:
    torch.manual_seed(0)
    model, example = build()
    model.eval()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = residual_report(capture_model(model, example))
    seconds = time.perf_counter() - start
    per_layer = collections.Counter(s.depth for s in report.sites)  # sites sharing a depth: one layer
    slots = {n: m for n, m in model.named_modules() if is_drop_path_slot(m)}
    out = {"family": name, "sites": len(report.sites), "per_layer": sorted(set(per_layer.values())),
           "layers": len(per_layer), "skipped": len(report.skipped), "seconds": seconds}
    if slots:
        # Ground truth: every call of the model's own DropPath modules in one forward (HF Swin
        # and BEiT call one module for both residuals of a layer). Layers built with an Identity
        # instead (rate 0 at depth 0) hold no ground truth and are left out of precision.
        calls = collections.Counter()
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: calls.update([n])) for n, m in slots.items()]
        with torch.no_grad():
            model(**example)
        for h in hooks:
            h.remove()
        truth = sum(calls.values())
        judged = [s for s in report.sites if any(n.startswith(layer_key(s.scope) + ".") for n in slots)]
        tp = sum(1 for s in judged if s.existing in slots)
        p = tp / len(judged) if judged else 0.0
        r = tp / truth if truth else 0.0
        out.update(truth=truth, precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated subset")
    args = parser.parse_args()
    fams = families()
    chosen = [f for f in args.families.split(",") if f] or list(fams)
    print(f"{'family':<11} {'sites':>5} {'layers':>6} {'per layer':>9} {'skipped':>7} {'s':>5}  P/R/F1 (own DropPath)")
    for name in chosen:
        try:
            row = measure(name, fams[name])
        except Exception as exc:  # a family the installed transformers cannot build
            print(f"{name:<11} error: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        prf = (f"{row['precision']:.2f}/{row['recall']:.2f}/{row['f1']:.2f} of {row['truth']}"
               if "truth" in row else "-")
        print(f"{name:<11} {row['sites']:>5} {row['layers']:>6} {str(row['per_layer']):>9} {row['skipped']:>7} "
              f"{row['seconds']:>5.1f}  {prf}")


if __name__ == "__main__":
    main()
