"""Pallas kernels for the diagonal linear scan: reference.py, gpu.py, tpu.py, ops.py."""

from pallas_kernels.linear_scan.ops import BlockSizes, linear_scan  # noqa: F401
