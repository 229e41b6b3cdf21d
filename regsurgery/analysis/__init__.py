"""Pure functions of captured block graphs: residual sites, conv stages, skippable branches."""

from .residual import ResidualSite, SiteReport, find_residual_sites, residual_report
from .skip import skip_blocker
from .stages import ConvStage, FeatureLayout, describe_feature_layout, find_conv_stages

__all__ = [
    "ConvStage",
    "FeatureLayout",
    "ResidualSite",
    "SiteReport",
    "describe_feature_layout",
    "find_conv_stages",
    "find_residual_sites",
    "residual_report",
    "skip_blocker",
]
