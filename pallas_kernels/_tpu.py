"""Pieces the Mosaic TPU kernels share.

Mosaic loads and stores a single row at a dynamic index only for 32-bit types:
a bfloat16 tile packs two rows into each sublane, so ``ref[pl.ds(t, 1), :]`` on
a bf16 block fails to compile ("cannot statically prove that index ... is a
multiple of 8"). Kernels that walk rows one at a time therefore copy their
``[rows, LANES]`` blocks into float32 VMEM scratch first (:func:`widen`) and
write narrow outputs through float32 scratch too (:func:`narrow`). Interpret
mode accepts either, so only a compile (``benchmarks/compile_check.py``) shows
the difference.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

LANES = 128
# (batch, channel blocks, time chunks): the chunk axis carries state, in order.
SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def interpret_params(interpret: bool):
    """``pallas_call``'s ``interpret=`` for a TPU kernel: the TPU interpreter, or compile."""
    return pltpu.InterpretParams() if interpret else False


def row_scratch(rows: int):
    """A float32 ``[rows, LANES]`` VMEM scratch buffer."""
    return pltpu.VMEM((rows, LANES), jnp.float32)


def widen(block_ref, scratch_ref):
    """Copies a block into float32 scratch and returns the scratch ref."""
    scratch_ref[...] = block_ref[...].astype(jnp.float32)
    return scratch_ref


def narrow(scratch_ref, block_ref):
    """Writes float32 scratch rows to an output block in its dtype."""
    block_ref[...] = scratch_ref[...].astype(block_ref.dtype)
