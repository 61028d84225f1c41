"""``pl.pallas_call`` with named refs: how every kernel here is called.

A kernel body receives one dict of refs, named as its inputs, outputs and
scratch buffers are, instead of a positional list; optional inputs and
outputs (a gate, a decay, segment flags) are simply absent from it.
"""

from __future__ import annotations

from jax.experimental import pallas as pl


def call(kernel, inputs: dict, outputs: dict, *, grid, interpret, scratch: dict | None = None,
         **kwargs) -> dict:
    """Runs ``kernel`` over ``grid``; entries whose array (or shape) is None are left out.

    Args:
      kernel: ``kernel(refs: dict)`` with refs named as in ``inputs``,
        ``outputs`` and ``scratch``.
      inputs: name -> ``(array or None, BlockSpec)``.
      outputs: name -> ``(jax.ShapeDtypeStruct or None, BlockSpec)``.
      grid, interpret: as ``pl.pallas_call``'s.
      scratch: name -> scratch buffer shape (e.g. ``pltpu.VMEM(...)``).
      kwargs: passed to ``pl.pallas_call`` (``compiler_params``, ``name``).

    Returns:
      name -> output array, for the outputs that were not None.
    """
    inputs = {n: entry for n, entry in inputs.items() if entry[0] is not None}
    outputs = {n: entry for n, entry in outputs.items() if entry[0] is not None}
    scratch = scratch or {}
    names = [*inputs, *outputs, *scratch]

    def body(*refs):
        kernel(dict(zip(names, refs)))

    results = pl.pallas_call(
        body,
        out_shape=[shape for shape, _ in outputs.values()],
        grid=grid,
        in_specs=[spec for _, spec in inputs.values()],
        out_specs=[spec for _, spec in outputs.values()],
        scratch_shapes=tuple(scratch.values()),
        interpret=interpret,
        **kwargs,
    )(*[array for array, _ in inputs.values()])
    return dict(zip(outputs, results))
