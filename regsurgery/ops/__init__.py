"""The regularizer ops: a functional form and a thin module for each (DropPath, DropBlock,
skip-compute DropPath), and the argument checks they share."""

from .drop import (
    DropBlock2d,
    DropBlock3d,
    DropPath,
    RateTypeError,
    RegularizerModule,
    calibrate_gamma,
    check_rate,
    drop_block2d,
    drop_block3d,
    drop_path,
    expected_drop_fraction,
)
from .dropout import Dropout, dropout
from .skip import SkipDropPath, skip_drop_path

__all__ = [
    "RateTypeError",
    "check_rate",
    "RegularizerModule",
    "drop_path",
    "DropPath",
    "drop_block2d",
    "drop_block3d",
    "DropBlock2d",
    "DropBlock3d",
    "calibrate_gamma",
    "expected_drop_fraction",
    "dropout",
    "Dropout",
    "skip_drop_path",
    "SkipDropPath",
]
