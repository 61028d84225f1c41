"""Softmax attention as Pallas kernels (FlashAttention-2), forward and backward.

``ops.attention`` is the entry point (called by ``effarch.ops.attention(...,
implementation="pallas")``); ``gpu`` holds the Pallas Triton kernels, ``tpu``
the splash-attention adapter and the kernels' Mosaic form, ``_block`` the
per-block math both share and ``reference`` the plain masked softmax they are
tested against.
"""

from pallas_kernels.attention._block import MASKED_LOGIT
from pallas_kernels.attention.ops import BlockSizes, attention

__all__ = ["MASKED_LOGIT", "BlockSizes", "attention"]
