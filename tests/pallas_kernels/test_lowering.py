"""The real kernels lower, and compile where a compiler is installed, with no device.

Interpret mode (the other kernel tests) proves the math. These tests prove the
lowering: every kernel family, forward and backward, lowers to Triton kernels
for ``cuda`` and to Mosaic kernels for ``tpu`` on this CPU. With the ``aot``
extra (``pip install -e ".[aot]"``: libtpu and triton) they also compile: the
TPU kernels by XLA + Mosaic for a compile-only TPU v5e, the Triton kernels to
sm_90a cubins by ptxas. Speed still needs the device.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from pallas_kernels import _platform
from pallas_kernels import attention as attention_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import compile_check  # noqa: E402  (benchmarks/compile_check.py, the kernel tooling)

CASES = {case.name: case for case in compile_check.cases()}
EXPECTED_TARGET = {"cuda": compile_check.TRITON_TARGET, "tpu": compile_check.TPU_TARGET}
# Shared memory one program may use: 227 KiB on sm_90 (H100).
SM90_SHARED_LIMIT = 227 * 1024


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_lower_for_platform(name, platform):
    case = CASES[name]
    calls = compile_check.kernel_calls(compile_check.lower(case, platform))
    # Each forward and backward pallas_call is a real kernel, none interpreted away.
    assert [call.target for call in calls] == [EXPECTED_TARGET[platform]] * case.kernels[platform]
    if platform == "cuda":
        assert len({call.name for call in calls}) == len(calls)
        for call in calls:
            assert call.num_warps in (1, 2, 4, 8, 16)
            assert f"tt.func public @{call.name}" in compile_check.triton_text(call)


def test_lowering_for_makes_kernels_compile_for_the_named_backend():
    assert _platform.resolve_target().interpret  # this CPU
    with _platform.lowering_for("tpu"):
        target = _platform.resolve_target()
        assert (target.backend, target.interpret) == ("tpu", False)
    assert _platform.resolve_target().interpret


def test_lowering_for_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend='cuda'"):
        with _platform.lowering_for("cuda"):
            pass


def test_lower_rejects_unknown_platform():
    with pytest.raises(ValueError, match="platform='gpu'"):
        compile_check.lower(CASES["linear_scan"], "gpu")


@pytest.fixture(scope="module")
def tpu_topology():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install -e ".[aot]")')
    return compile_check.tpu_topology("v5e:2x2")


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_compile_for_tpu_v5e(name, tpu_topology):
    memory = compile_check.compile_tpu(CASES[name], tpu_topology)
    assert memory["output"] > 0


@pytest.fixture(scope="module")
def triton():
    if not compile_check.triton_available():
        pytest.skip('triton is not installed (pip install -e ".[aot]")')


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_kernels_compile_for_sm90(name, triton):
    for call in compile_check.kernel_calls(compile_check.lower(CASES[name], "cuda")):
        build = compile_check.compile_triton(call, capability=90)
        assert 0 < build.registers <= 255, build
        assert build.shared_bytes <= SM90_SHARED_LIMIT, build


def _public_ops_calls():
    """``effarch.ops`` with ``implementation="pallas"``: the path models take."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    sds = jax.ShapeDtypeStruct
    return {
        "linear_attention": (
            lambda q, k, v, ld: ops.linear_attention(q, k, v, ld, implementation="pallas")[0],
            (sds((1, 128, 2, 64), bf16),) * 3 + (sds((1, 128, 2, 64), f32),)),
        "selective_scan": (
            lambda x, dt, A, B, C: ops.selective_scan(x, dt, A, B, C, implementation="pallas")[0],
            (sds((1, 64, 128), bf16),) * 2 + (sds((128, 16), f32),)
            + (sds((1, 64, 1, 16), bf16),) * 2),
        "linear_scan": (
            lambda x, a: ops.linear_scan(x, a, implementation="pallas")[0],
            (sds((1, 64, 256), bf16),) * 2),
        "attention": (
            lambda q, k, v: ops.attention(q, k, v, implementation="pallas"),
            (sds((1, 256, 4, 128), bf16),) + (sds((1, 256, 2, 128), bf16),) * 2),
    }


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("op", ["linear_attention", "selective_scan", "linear_scan", "attention"])
def test_public_ops_lower_to_kernels(op, platform):
    fn, args = _public_ops_calls()[op]

    def forward_and_backward(*xs):
        return jax.grad(lambda *ys: fn(*ys).astype(jnp.float32).sum(),
                        argnums=tuple(range(len(xs))))(*xs)

    case = compile_check.Case(op, op, forward_and_backward, args, kernels={})
    calls = compile_check.kernel_calls(compile_check.lower(case, platform))
    assert calls and {call.target for call in calls} == {EXPECTED_TARGET[platform]}


def _attention_case(segments: str | None, t: int = 1000) -> compile_check.Case:
    """Softmax attention, forward and backward, GQA 8/2, D = 128, window, softcap.

    On TPU, one segment-id array takes splash attention; a (q, kv) id pair
    takes our Mosaic kernels (tpu.splash_unsupported). Either way three
    kernels: forward, dq, dk/dv.
    """
    sds = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16

    def fn(q, k, v, ids):
        segment_ids = {None: None, "runs": ids, "pair": (ids, ids)}[segments]
        return jax.vjp(lambda q, k, v: attention_kernel.attention(
            q, k, v, window=300, segment_ids=segment_ids, softcap=30.0), q, k, v)[1](
                jnp.ones((1, t, 8, 128), bf16))

    args = (sds((1, t, 8, 128), bf16),) + (sds((1, t, 2, 128), bf16),) * 2
    args += (sds((1, t), jnp.int32),)
    return compile_check.Case(f"attention/{segments}", "attention", fn, args,
                              kernels={"cuda": 3, "tpu": 3})


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("segments", [None, "runs", "pair"])
def test_attention_kernels_lower_for_platform(segments, platform):
    case = _attention_case(segments)
    calls = compile_check.kernel_calls(compile_check.lower(case, platform))
    assert [call.target for call in calls] == [EXPECTED_TARGET[platform]] * case.kernels[platform]
    if platform == "cuda":
        assert [call.name for call in calls] == ["attention_fwd", "attention_bwd_dq",
                                                 "attention_bwd_dkv"]
        for call in calls:
            assert f"tt.func public @{call.name}" in compile_check.triton_text(call)


@pytest.mark.parametrize("segments", ["runs", "pair"])
def test_attention_kernels_compile_for_tpu_v5e(segments, tpu_topology):
    memory = compile_check.compile_tpu(_attention_case(segments), tpu_topology)
    assert memory["output"] > 0


def test_attention_triton_kernels_compile_for_sm90(triton):
    for call in compile_check.kernel_calls(compile_check.lower(_attention_case("runs"), "cuda")):
        build = compile_check.compile_triton(call, capability=90)
        assert 0 < build.registers <= 255, build
        assert build.shared_bytes <= SM90_SHARED_LIMIT, build
