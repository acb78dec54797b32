"""Triton kernels for effikern (installed as ``effikern.kernels``).

Modules here import triton at their top; the op layer imports them lazily, only when the
triton backend is asked for, so effikern itself never needs triton.
"""
