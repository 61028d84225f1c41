"""Pallas kernels for the selective scan: reference.py, gpu.py, tpu.py, ops.py."""

from pallas_kernels.selective_scan.ops import BlockSizes, selective_scan  # noqa: F401
