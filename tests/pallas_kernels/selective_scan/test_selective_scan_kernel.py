"""The selective-scan Pallas kernels against the float32 recurrent reference (pallas_kernels/selective_scan).

On CPU the kernels run in Pallas interpret mode: the GPU (Triton) kernel with
``interpret=True``, the TPU (Mosaic) kernel with ``pltpu.InterpretParams()``.
Interpret mode proves the math, not that a kernel lowers: the ``gpu``-marked
tests compile the GPU kernel and run only where a GPU is present.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from effarch.testing import assert_matches_reference, assert_relative_close
from pallas_kernels import selective_scan as selective_kernel
from pallas_kernels.selective_scan.reference import random_inputs, selective_scan_reference

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiling the GPU kernel needs a GPU")

# Small blocks so that D = 20 is not a multiple of block_d and T spans several chunks.
BLOCKS = selective_kernel.BlockSizes(block_d=16, chunk=16)

# (T, D, N, G, dtype, dt_shift, packed): dt_shift +4 large steps, -8 tiny ones.
CASES = {
    "T1_G1_f32": (1, 20, 4, 1, jnp.float32, 0.0, False),
    "T63_G2_f32_large_dt_packed": (63, 20, 4, 2, jnp.float32, 4.0, True),
    "T63_G1_bf16_tiny_dt": (63, 20, 4, 1, jnp.bfloat16, -8.0, False),
    "T200_G4_bf16": (200, 20, 4, 4, jnp.bfloat16, 0.0, True),
    "T33_N6_G2_f32": (33, 20, 6, 2, jnp.float32, 0.0, False),  # N padded to 8 on GPU
}
SLOW_ON_TPU = {"T200_G4_bf16"}


def _check(kernel, reference, inputs, dtype):
    out, state = assert_matches_reference(lambda v: kernel(**v), lambda v: reference(**v), inputs, dtype)
    assert out.dtype == inputs["x"].dtype and state.dtype == jnp.float32


def _params(backend):
    return [
        pytest.param(case, marks=pytest.mark.slow) if backend == "tpu" and case in SLOW_ON_TPU else case
        for case in CASES
    ]


def _run(case, backend, interpret):
    time, channels, state, groups, dtype, dt_shift, packed = CASES[case]
    inputs = random_inputs(jax.random.PRNGKey(0), batch=2, time=time, channels=channels, state=state,
                           groups=groups, dtype=dtype, dt_shift=dt_shift)
    segment_ids = None
    if packed:
        segment_ids = (jnp.arange(time)[None, :] >= jnp.array([[time // 3], [time // 2]])).astype(jnp.int32)
    kernel = functools.partial(selective_kernel.selective_scan, segment_ids=segment_ids, block_sizes=BLOCKS,
                               backend=backend, interpret=interpret)
    _check(kernel, functools.partial(selective_scan_reference, segment_ids=segment_ids), inputs, dtype)


@pytest.mark.parametrize("case", _params("gpu"))
def test_gpu_kernel_interpret(case):
    _run(case, "gpu", interpret=True)


@pytest.mark.parametrize("case", _params("tpu"))
def test_tpu_kernel_interpret(case):
    _run(case, "tpu", interpret=True)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_kernel_compiled(case):
    _run(case, "gpu", interpret=False)


def test_without_optional_inputs():
    inputs = random_inputs(jax.random.PRNGKey(3), batch=1, time=19, channels=20, state=4)
    core = {n: inputs[n] for n in ("x", "dt", "A", "B", "C")}
    kernel = functools.partial(selective_kernel.selective_scan, dt_softplus=False, block_sizes=BLOCKS)
    _check(kernel, functools.partial(selective_scan_reference, dt_softplus=False), core, jnp.float32)


def test_op_dispatches_to_the_kernel():
    inputs = random_inputs(jax.random.PRNGKey(4), batch=1, time=9, channels=20, state=4, groups=2)
    y, h = ops.selective_scan(**inputs, return_final_state=True, implementation="pallas")
    assert_relative_close((y, h), selective_scan_reference(**inputs), jnp.float32, "selective")


@pytest.mark.parametrize("make, message", [
    (lambda: selective_kernel.BlockSizes(block_d=24), "block_d=24 must be a power of 2"),
    (lambda: selective_kernel.BlockSizes(chunk=12), "chunk=12 must be a positive multiple"),
], ids=["block_d", "chunk"])
def test_bad_block_sizes_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_shape_check_names_arrays():
    inputs = random_inputs(jax.random.PRNGKey(6), batch=1, time=4, channels=6, state=2)
    with pytest.raises(ValueError, match="axis N of B"):
        selective_kernel.selective_scan(**{**inputs, "B": jnp.zeros((1, 4, 1, 3))})
