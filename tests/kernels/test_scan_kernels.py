"""Selective-scan and linear-scan Pallas kernels against the float32 recurrent reference.

On CPU both kernels run in Pallas interpret mode: the GPU (Triton) kernel with
``interpret=True``, the TPU (Mosaic) kernel with ``pltpu.InterpretParams()``.
Interpret mode proves the math, not that a kernel lowers: the ``gpu``-marked
tests compile the GPU kernel and run only where a GPU is present.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from effarch.testing import assert_relative_close
from pallas_kernels import linear_scan as linear_kernel
from pallas_kernels import selective_scan as selective_kernel
from pallas_kernels.linear_scan.reference import linear_scan_reference
from pallas_kernels.linear_scan.reference import random_inputs as linear_inputs
from pallas_kernels.selective_scan.reference import random_inputs as selective_inputs
from pallas_kernels.selective_scan.reference import selective_scan_reference

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiling the GPU kernel needs a GPU")

# Small blocks so that D = 20 is not a multiple of block_d and T spans several chunks.
SELECTIVE_BLOCKS = selective_kernel.BlockSizes(block_d=16, chunk=16)
LINEAR_BLOCKS = linear_kernel.BlockSizes(block_d=16, chunk=16)


def _grads_and_outputs(fn, inputs, seed=1):
    """Outputs and the gradient of a random projection of both outputs wrt every input."""
    out_shapes = jax.eval_shape(fn, inputs)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(out_shapes))
    weights = [jax.random.normal(k, s.shape) for k, s in zip(keys, out_shapes)]

    def loss(inputs):
        outputs = fn(inputs)
        value = sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(outputs, weights))
        return value, outputs

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(inputs)
    return outputs, grads


def _check(fn, reference, inputs, dtype):
    (out, state), grads = _grads_and_outputs(fn, inputs)
    (out_ref, state_ref), grads_ref = _grads_and_outputs(reference, inputs)
    assert out.dtype == inputs["x"].dtype and state.dtype == jnp.float32
    chex.assert_equal_shape([out, out_ref])
    chex.assert_equal_shape([state, state_ref])
    assert_relative_close(out, out_ref, dtype, "output")
    assert_relative_close(state, state_ref, dtype, "final_state")
    assert set(grads) == set(inputs)
    assert_relative_close(grads, grads_ref, dtype, "grad")


# (T, D, N, G, dtype, dt_shift, packed): dt_shift +4 large steps, -8 tiny ones.
SELECTIVE_CASES = {
    "T1_G1_f32": (1, 20, 4, 1, jnp.float32, 0.0, False),
    "T63_G2_f32_large_dt_packed": (63, 20, 4, 2, jnp.float32, 4.0, True),
    "T63_G1_bf16_tiny_dt": (63, 20, 4, 1, jnp.bfloat16, -8.0, False),
    "T200_G4_bf16": (200, 20, 4, 4, jnp.bfloat16, 0.0, True),
    "T33_N6_G2_f32": (33, 20, 6, 2, jnp.float32, 0.0, False),  # N padded to 8 on GPU
}
SLOW_ON_TPU = {"T200_G4_bf16"}


def _selective_case(case):
    time, channels, state, groups, dtype, dt_shift, packed = SELECTIVE_CASES[case]
    inputs = selective_inputs(
        jax.random.PRNGKey(0), batch=2, time=time, channels=channels, state=state,
        groups=groups, dtype=dtype, dt_shift=dt_shift,
    )
    segment_ids = None
    if packed:
        segment_ids = (jnp.arange(time)[None, :] >= jnp.array([[time // 3], [time // 2]])).astype(
            jnp.int32
        )
    return inputs, segment_ids, dtype


def _selective_params(backend):
    return [
        pytest.param(case, marks=pytest.mark.slow) if backend == "tpu" and case in SLOW_ON_TPU
        else case
        for case in SELECTIVE_CASES
    ]


def _run_selective(case, backend, interpret):
    inputs, segment_ids, dtype = _selective_case(case)
    kernel = functools.partial(
        selective_kernel.selective_scan, segment_ids=segment_ids, block_sizes=SELECTIVE_BLOCKS,
        backend=backend, interpret=interpret,
    )
    reference = functools.partial(selective_scan_reference, segment_ids=segment_ids)
    _check(lambda v: kernel(**v), lambda v: reference(**v), inputs, dtype)


@pytest.mark.parametrize("case", _selective_params("gpu"))
def test_selective_scan_gpu_kernel_interpret(case):
    _run_selective(case, "gpu", interpret=True)


@pytest.mark.parametrize("case", _selective_params("tpu"))
def test_selective_scan_tpu_kernel_interpret(case):
    _run_selective(case, "tpu", interpret=True)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", list(SELECTIVE_CASES))
def test_selective_scan_gpu_kernel_compiled(case):
    _run_selective(case, "gpu", interpret=False)


def test_selective_scan_without_optional_inputs():
    inputs = selective_inputs(jax.random.PRNGKey(3), batch=1, time=19, channels=20, state=4)
    core = {n: inputs[n] for n in ("x", "dt", "A", "B", "C")}
    kernel = functools.partial(
        selective_kernel.selective_scan, dt_softplus=False, block_sizes=SELECTIVE_BLOCKS
    )
    reference = functools.partial(selective_scan_reference, dt_softplus=False)
    _check(lambda v: kernel(**v), lambda v: reference(**v), core, jnp.float32)


# (T, D, dtype, decay_shift, packed): +6 weak decay (a near 1), -3 strong decay.
LINEAR_CASES = {
    "T1_f32": (1, 20, jnp.float32, 2.0, False),
    "T63_f32_weak_packed": (63, 20, jnp.float32, 6.0, True),
    "T63_bf16_strong": (63, 20, jnp.bfloat16, -3.0, False),
    "T300_bf16_weak_packed": (300, 20, jnp.bfloat16, 6.0, True),
}


def _run_linear(case, backend, interpret):
    time, channels, dtype, shift, packed = LINEAR_CASES[case]
    inputs = linear_inputs(
        jax.random.PRNGKey(0), batch=2, time=time, channels=channels, dtype=dtype,
        decay_shift=shift,
    )
    segment_ids = None
    if packed:
        segment_ids = (jnp.arange(time)[None, :] >= jnp.array([[time // 3], [time // 2]])).astype(
            jnp.int32
        )
    kernel = functools.partial(
        linear_kernel.linear_scan, segment_ids=segment_ids, block_sizes=LINEAR_BLOCKS,
        backend=backend, interpret=interpret,
    )
    reference = functools.partial(linear_scan_reference, segment_ids=segment_ids)
    _check(lambda v: kernel(**v), lambda v: reference(**v), inputs, dtype)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_scan_kernel_interpret(case, backend):
    _run_linear(case, backend, interpret=True)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_scan_gpu_kernel_compiled(case):
    _run_linear(case, "gpu", interpret=False)


def test_ops_dispatch_to_pallas():
    sel = selective_inputs(jax.random.PRNGKey(4), batch=1, time=9, channels=20, state=4, groups=2)
    y, h = ops.selective_scan(**sel, return_final_state=True, implementation="pallas")
    assert_relative_close((y, h), selective_scan_reference(**sel), jnp.float32, "selective")
    lin = linear_inputs(jax.random.PRNGKey(5), batch=1, time=9, channels=20)
    h, final = ops.linear_scan(**lin, return_final_state=True, implementation="pallas")
    assert_relative_close((h, final), linear_scan_reference(**lin), jnp.float32, "linear")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: selective_kernel.BlockSizes(block_d=24), "block_d=24 must be a power of 2"),
        (lambda: selective_kernel.BlockSizes(chunk=12), "chunk=12 must be a positive multiple"),
        (lambda: linear_kernel.BlockSizes(block_d=0), "block_d=0 must be a power of 2"),
    ],
    ids=["selective_block_d", "selective_chunk", "linear_block_d"],
)
def test_bad_block_sizes_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_shape_check_names_arrays():
    sel = selective_inputs(jax.random.PRNGKey(6), batch=1, time=4, channels=6, state=2)
    with pytest.raises(ValueError, match="axis N of B"):
        selective_kernel.selective_scan(**{**sel, "B": jnp.zeros((1, 4, 1, 3))})
