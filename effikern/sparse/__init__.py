"""Sparse weight formats (CSR, BSR, 2:4) and converters for pruned layers; see ``formats``."""

from .formats import (
           FORMATS,
           PANEL,
           SparseWeight,
           csr_coordinates,
           densify,
           from_dense,
           is_2of4,
           is_block,
           n_panels,
           to_2of4,
           to_block,
           to_unstructured,
)

__all__ = ["FORMATS", "PANEL", "SparseWeight", "csr_coordinates", "densify", "from_dense", "is_2of4", "is_block",
           "n_panels", "to_2of4", "to_block", "to_unstructured"]
