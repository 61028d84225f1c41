"""Chunked linear attention (SSD / GLA) as Pallas kernels, forward and backward.

``ops.chunked_linear_attention`` is the entry point (called by
``effarch.ops.linear_attention(..., implementation="pallas")``); ``gpu`` holds the
Pallas Triton kernels, ``tpu`` the Mosaic TPU kernels, ``_chunk`` the per-chunk
math both share and ``reference`` the float32 recurrence they are tested against.
"""

from pallas_kernels.chunked_linear_attention.ops import BlockSizes, chunked_linear_attention

__all__ = ["BlockSizes", "chunked_linear_attention"]
