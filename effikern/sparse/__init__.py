"""Sparse weight formats (CSR, BSR, 2:4) and converters for pruned layers; see ``formats``."""

from .formats import (
           FORMATS,
           SparseWeight,
           densify,
           from_dense,
           is_2of4,
           is_block,
           to_2of4,
           to_block,
           to_unstructured,
)

__all__ = ["FORMATS", "SparseWeight", "densify", "from_dense", "is_2of4", "is_block", "to_2of4", "to_block",
           "to_unstructured"]
