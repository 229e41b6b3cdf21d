"""Detection equals the authors' placement on real timm / torchvision architectures.

The ground truth is read from the same architecture built with its own drop path on
(:func:`corpus.authors_placement`); detection runs on the model built with it off.
A subset of ``benchmarks/residual_corpus.py`` chosen to cover every rule of the detector: each
entry names the pattern it guards.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from corpus import authors_placement, get_entry

from regsurgery import residual_report

CASES = {
    "timm:resnet50": "bottleneck, 1x1-conv projection shortcut",
    "timm:resnext26ts": "byobnet blocks of timm ConvNormAct leaves (a conv, not a norm)",
    "timm:regnetx_002": "ConvNormAct branches without a separate norm",
    "timm:mobilenetv4_conv_small": "UIR blocks with layer scale, only some with a shortcut",
    "timm:res2net50_26w_4s": "hierarchical adds of split chunks are not residual",
    "timm:edgenext_xx_small": "split-chunk adds inside an SDTA block, channels-last residuals",
    "timm:efficientformer_l1": "pooling mixer marked by a layer scale, no norm",
    "timm:efficientformerv2_s0": "a 3x3 stride-2 conv shortcut is not a projection",
    "timm:poolformerv2_s12": "a learned res-scale on the shortcut",
    "timm:resmlp_12_224": "Affine + one token-mixing linear, layer-scaled",
    "timm:mvitv2_tiny": "pooled projection shortcut through reshapes, a List[int] argument",
    "timm:hiera_tiny_224": "max-pooled projection shortcut",
    "timm:fastvit_t8": "RepMixer / MobileOne decoys next to real residuals",
    "timm:tnt_s_patch16_224": "outer tokens that lend only their shape are not a shortcut",
    "timm:mobilevit_xxs": "blocks that call drop path without an add; untraceable blocks",
    "torchvision:swin_t": "StochasticDepth slots, channels-last",
}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES), ids=list(CASES))
def test_detection_matches_the_authors_placement(key):
    entry = get_entry(key)
    torch.manual_seed(0)
    truth = authors_placement(entry.build(drop_path=True), entry.example_input()).sites
    assert sum(truth.values()) > 0
    found = Counter(s.scope for s in residual_report(entry.build(drop_path=False)).sites)
    assert found == truth, (
        f"{key} ({CASES[key]}): missed {dict(truth - found)}, extra {dict(found - truth)}"
    )
