"""regsurgery: structured regularization (DropPath, DropBlock) for any PyTorch model.

Data flow: model -> trace (block-local fx graphs) -> analyse (residual sites, conv stages)
-> plan (plain data) -> rewrite (same model object) -> train (schedules move rates)
-> strip -> export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .analysis import ResidualSite, SiteReport, find_residual_sites, residual_report
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
from .rewrite import apply_plan, inserted_modules, is_patched, plan_of, strip
from .surgery import (
    NoSitesError,
    apply_dropblock,
    apply_stochastic_depth,
    plan_dropblock,
    plan_stochastic_depth,
)

__version__ = "0.1.0"

# Modules written alongside: imported lazily so that a missing optional piece (onnx, safetensors)
# never breaks `import regsurgery`.
_LAZY = {
    "find_conv_stages": ("stages", "find_conv_stages"),
    "ConvStage": ("stages", "ConvStage"),
    "FeatureLayout": ("stages", "FeatureLayout"),
    "describe_feature_layout": ("stages", "describe_feature_layout"),
    "RateSchedule": ("schedule", "RateSchedule"),
    "load": ("checkpoint", "load"),
    "export_onnx": ("export", "export_onnx"),
    "register_builder": ("trust", "register_builder"),
    "UntrustedFileError": ("trust", "UntrustedFileError"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load
    from .export import export_onnx
    from .schedule import RateSchedule
    from .stages import ConvStage, FeatureLayout, describe_feature_layout, find_conv_stages
    from .trust import UntrustedFileError, register_builder


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module_name}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regsurgery' has no attribute {name!r}")


__all__ = [
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
    "UntrustedFileError",
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
    "register_builder",
    "residual_report",
    "strip",
]
