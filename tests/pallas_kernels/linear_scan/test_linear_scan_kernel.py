"""The linear-scan Pallas kernels against the float32 recurrent reference (pallas_kernels/linear_scan).

On CPU the kernels run in Pallas interpret mode; the ``gpu``-marked tests
compile the GPU kernel and run only where a GPU is present.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from effarch.testing import assert_matches_reference, assert_relative_close
from pallas_kernels import linear_scan as linear_kernel
from pallas_kernels.linear_scan.reference import linear_scan_reference, random_inputs

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiling the GPU kernel needs a GPU")

# Small blocks so that D = 20 is not a multiple of block_d and T spans several chunks.
BLOCKS = linear_kernel.BlockSizes(block_d=16, chunk=16)

# (T, D, dtype, decay_shift, packed): +6 weak decay (a near 1), -3 strong decay.
CASES = {
    "T1_f32": (1, 20, jnp.float32, 2.0, False),
    "T63_f32_weak_packed": (63, 20, jnp.float32, 6.0, True),
    "T63_bf16_strong": (63, 20, jnp.bfloat16, -3.0, False),
    "T300_bf16_weak_packed": (300, 20, jnp.bfloat16, 6.0, True),
}


def _run(case, backend, interpret):
    time, channels, dtype, shift, packed = CASES[case]
    inputs = random_inputs(jax.random.PRNGKey(0), batch=2, time=time, channels=channels, dtype=dtype,
                           decay_shift=shift)
    segment_ids = None
    if packed:
        segment_ids = (jnp.arange(time)[None, :] >= jnp.array([[time // 3], [time // 2]])).astype(jnp.int32)
    kernel = functools.partial(linear_kernel.linear_scan, segment_ids=segment_ids, block_sizes=BLOCKS,
                               backend=backend, interpret=interpret)
    reference = functools.partial(linear_scan_reference, segment_ids=segment_ids)
    out, state = assert_matches_reference(lambda v: kernel(**v), lambda v: reference(**v), inputs, dtype)
    assert out.dtype == inputs["x"].dtype and state.dtype == jnp.float32


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_interpret(case, backend):
    _run(case, backend, interpret=True)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_kernel_compiled(case):
    _run(case, "gpu", interpret=False)


def test_op_dispatches_to_the_kernel():
    inputs = random_inputs(jax.random.PRNGKey(5), batch=1, time=9, channels=20)
    h, final = ops.linear_scan(**inputs, return_final_state=True, implementation="pallas")
    assert_relative_close((h, final), linear_scan_reference(**inputs), jnp.float32, "linear")


def test_bad_block_sizes_raise_value_error():
    with pytest.raises(ValueError, match="block_d=0 must be a power of 2"):
        linear_kernel.BlockSizes(block_d=0)
