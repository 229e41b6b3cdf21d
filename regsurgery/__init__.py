"""regsurgery: structured regularization (DropPath, DropBlock, Dropout, LayerDrop) for any PyTorch model.

Data flow, one layer per sub-package, dependencies pointing one way (see docs/ARCHITECTURE.md):
ops <- capture <- analysis <- plan <- rewrite <- api / schedule <- io <- cli.
"""

from __future__ import annotations

from ._version import __version__
from .analysis.residual import (
    RejectedAdd,
    ResidualSite,
    SiteReport,
    find_residual_sites,
    residual_report,
)
from .analysis.stages import ConvStage, FeatureLayout, describe_feature_layout, find_conv_stages
from .api import (
    NoSitesError,
    apply_dropblock,
    apply_stochastic_depth,
    plan_dropblock,
    plan_stochastic_depth,
)
from .api_dropout import apply_dropout, plan_dropout
from .api_layerdrop import apply_layerdrop, prune_layers
from .io.checkpoint import load
from .io.export import export_onnx
from .io.trust import UntrustedFileError, register_builder
from .ops import (
    DropBlock2d,
    DropBlock3d,
    Dropout,
    DropPath,
    RegularizerModule,
    calibrate_gamma,
    drop_block2d,
    drop_block3d,
    drop_path,
    dropout,
    expected_drop_fraction,
)
from .plan import Plan, PlannedOp
from .rewrite.apply import apply_plan, inserted_modules, is_patched, plan_of, strip
from .schedule import RateSchedule

__all__ = [
    "__version__",
    "ConvStage",
    "DropBlock2d",
    "DropBlock3d",
    "DropPath",
    "Dropout",
    "FeatureLayout",
    "NoSitesError",
    "Plan",
    "PlannedOp",
    "RateSchedule",
    "RegularizerModule",
    "ResidualSite",
    "SiteReport",
    "UntrustedFileError",
    "apply_dropblock",
    "apply_dropout",
    "apply_layerdrop",
    "apply_plan",
    "apply_stochastic_depth",
    "calibrate_gamma",
    "describe_feature_layout",
    "drop_block2d",
    "drop_block3d",
    "drop_path",
    "dropout",
    "expected_drop_fraction",
    "export_onnx",
    "find_conv_stages",
    "find_residual_sites",
    "inserted_modules",
    "is_patched",
    "load",
    "plan_dropblock",
    "plan_dropout",
    "plan_of",
    "plan_stochastic_depth",
    "prune_layers",
    "register_builder",
    "residual_report",
    "RejectedAdd",
    "strip",
]
