"""regsurgery: structured regularization (DropPath, DropBlock) for any PyTorch model.

Data flow, one layer per sub-package, dependencies pointing one way (see docs/ARCHITECTURE.md):
ops <- capture <- analysis <- plan <- rewrite <- api / schedule <- io <- cli.
"""

from __future__ import annotations

from ._version import __version__
from .analysis.residual import RejectedAdd, ResidualSite, SiteReport, find_residual_sites, residual_report
from .analysis.stages import ConvStage, FeatureLayout, describe_feature_layout, find_conv_stages
from .api import (
    NoSitesError,
    apply_dropblock,
    apply_stochastic_depth,
    plan_dropblock,
    plan_stochastic_depth,
)
from .io.checkpoint import load
from .io.export import export_onnx
from .ops import (
    DropBlock2d,
    DropBlock3d,
    DropPath,
    RegularizerModule,
    calibrate_gamma,
    drop_block2d,
    drop_block3d,
    drop_path,
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
    "FeatureLayout",
    "NoSitesError",
    "Plan",
    "PlannedOp",
    "RateSchedule",
    "RegularizerModule",
    "ResidualSite",
    "SiteReport",
    "apply_dropblock",
    "apply_plan",
    "apply_stochastic_depth",
    "calibrate_gamma",
    "describe_feature_layout",
    "drop_block2d",
    "drop_block3d",
    "drop_path",
    "expected_drop_fraction",
    "export_onnx",
    "find_conv_stages",
    "find_residual_sites",
    "inserted_modules",
    "is_patched",
    "load",
    "plan_dropblock",
    "plan_of",
    "plan_stochastic_depth",
    "residual_report",
    "RejectedAdd",
    "strip",
]
