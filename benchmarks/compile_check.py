"""Lower and compile every kernel for a GPU or TPU this machine lacks.

Interpret mode proves a kernel's math on a CPU, not that it lowers. This
module (tooling beside the kernels, not part of ``pallas_kernels``) lowers the
real kernels, forward and backward, ahead of time:

- ``lower(case, "cuda" | "tpu")``: the Pallas lowering (Triton or Mosaic) with
  ``Traced.lower(lowering_platforms=...)``. It needs nothing beyond jax and is
  what ``tests/pallas_kernels/test_lowering.py`` runs on every CPU.
- ``triton_kernels(lowered)`` + ``compile_triton(...)``: the Triton modules the
  GPU kernels emit, compiled to PTX and a cubin by the ``triton`` package, with
  ``ptxas -v``'s registers, spills and shared memory per kernel (``pip install
  triton``; a GPU is not needed).
- ``compile_tpu(case, topology)``: XLA + Mosaic compile for a compile-only TPU
  topology (``pip install "jax[tpu]"`` for the libtpu that matches jax; a TPU is
  not needed).

``benchmarks/kernel_compile.py`` runs all three over :data:`CASES` and saves a
table. What none of this shows is speed, or a fault that only appears when the
compiled code runs: that still needs the device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax.experimental import topologies
from jaxlib.triton import dialect

from pallas_kernels import _platform, chunked_linear_attention, linear_scan, selective_scan

# Compile-only TPU topologies load libtpu, which by default allows one process
# per machine (a lockfile); test workers and this module's users may be several.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TRITON_TARGET = "__gpu$xla.gpu.triton"
MOSAIC_GPU_TARGETS = ("mosaic_gpu", "mosaic_gpu_v2")
TPU_TARGET = "tpu_custom_call"
PLATFORM_BACKEND = {"cuda": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel configuration: ``fn(*args)`` returns outputs and every gradient.

    Attributes:
      name: unique label.
      op: the ``pallas_kernels`` op folder.
      fn: a pure function of ``args``; its forward and backward kernels both run.
      args: ``jax.ShapeDtypeStruct`` per argument.
      kernels: how many ``pallas_call``s one call lowers to, per backend.
    """

    name: str
    op: str
    fn: Callable
    args: tuple
    kernels: dict


def _value_and_grads(f):
    """``args -> (outputs, vjp(ones))``: each forward and backward kernel runs once."""

    def run(*args):
        outputs, vjp = jax.vjp(f, *args)
        return outputs, vjp(jax.tree.map(jnp.ones_like, outputs))

    return run


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _chunked_case(decay: str, kd: int, *, segments: bool = False) -> Case:
    b, t, h = 2, 256, 2
    f32 = jnp.float32
    decay_shape = {"none": None, "scalar": (b, t, h), "per_key": (b, t, h, kd)}[decay]
    ids = jnp.repeat(jnp.arange(2), t // 2)[None].repeat(b, 0) if segments else None

    def fn(q, k, v, s0, *log_decay):
        return chunked_linear_attention.chunked_linear_attention(
            q, k, v, log_decay[0] if log_decay else None, scale=kd ** -0.5,
            initial_state=s0, return_final_state=True, segment_ids=ids, chunk_size=64)

    args = (_sds((b, t, h, kd)),) * 3 + (_sds((b, h, kd, kd), f32),)
    if decay_shape:
        args += (_sds(decay_shape, f32),)
    name = f"chunked_linear_attention/{decay}/K{kd}" + ("/segments" if segments else "")
    # GPU: states + outputs forward, dstates + grads backward; TPU: one fused
    # kernel per pass.
    return Case(name, "chunked_linear_attention", _value_and_grads(fn), args,
                kernels={"cuda": 4, "tpu": 2})


def _selective_scan_case(groups: int) -> Case:
    b, t, d, n = 2, 256, 256, 16
    f32 = jnp.float32

    def fn(x, dt, z, A, B, C, D, dt_bias, h0):
        return selective_scan.selective_scan(x, dt, A, B, C, D, z, dt_bias=dt_bias,
                                             initial_state=h0)

    args = (_sds((b, t, d)),) * 3 + (_sds((d, n), f32), _sds((b, t, groups, n)),
                                     _sds((b, t, groups, n)), _sds((d,), f32),
                                     _sds((d,), f32), _sds((b, d, n), f32))
    return Case(f"selective_scan/G{groups}", "selective_scan", _value_and_grads(fn), args,
                kernels={"cuda": 2, "tpu": 2})


def _linear_scan_case() -> Case:
    b, t, d = 2, 256, 512

    def fn(x, a, h0):
        return linear_scan.linear_scan(x, a, initial_state=h0)

    args = (_sds((b, t, d)), _sds((b, t, d)), _sds((b, d), jnp.float32))
    return Case("linear_scan", "linear_scan", _value_and_grads(fn), args,
                kernels={"cuda": 2, "tpu": 2})


def cases() -> list[Case]:
    """Every kernel family at shapes a model uses (bf16 inputs), forward and backward."""
    return [
        *(_chunked_case(decay, kd) for decay in ("none", "scalar", "per_key") for kd in (64, 128)),
        _chunked_case("scalar", 64, segments=True),
        _chunked_case("per_key", 64, segments=True),
        _selective_scan_case(1),
        _selective_scan_case(2),
        _linear_scan_case(),
    ]


def lower(case: Case, platform: str):
    """``jax.stages.Lowered`` of the case's real kernels for ``"cuda"`` or ``"tpu"``."""
    if platform not in PLATFORM_BACKEND:
        raise ValueError(f"platform={platform!r}; expected one of {tuple(PLATFORM_BACKEND)}.")
    with _platform.lowering_for(PLATFORM_BACKEND[platform]):
        traced = jax.jit(_fresh(case.fn)).trace(*case.args)
        return traced.lower(lowering_platforms=(platform,))


def _fresh(fn):
    """A new function object, so jit's trace cache (blind to ``lowering_for``) misses."""
    return lambda *args: fn(*args)


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One ``pallas_call`` as it appears in the lowered module.

    Attributes:
      target: the custom call's target name.
      name: the kernel's name (Triton kernels only, else "").
      num_warps, num_stages: Triton launch parameters (0 elsewhere).
      ir: the serialized kernel module (Triton MLIR bytecode; else b"").
    """

    target: str
    name: str = ""
    num_warps: int = 0
    num_stages: int = 0
    ir: bytes = b""


def kernel_calls(lowered) -> list[KernelCall]:
    """The kernel custom calls in a lowered module, in program order."""
    calls = []

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "stablehlo.custom_call":
                        calls.append(_kernel_call(op.operation))
                    walk(op.operation)

    walk(lowered.compiler_ir().operation)
    return [c for c in calls if c is not None]


def _kernel_call(op) -> KernelCall | None:
    target = ir.StringAttr(op.attributes["call_target_name"]).value
    if target == TRITON_TARGET:
        cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
        return KernelCall(
            target=target,
            name=ir.StringAttr(cfg["name"]).value,
            num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
            num_stages=ir.IntegerAttr(cfg["num_stages"]).value,
            ir=ir.StringAttr(cfg["ir"]).value_bytes,
        )
    if target == TPU_TARGET or target in MOSAIC_GPU_TARGETS:
        return KernelCall(target=target)
    return None


def triton_text(call: KernelCall) -> str:
    """The Triton module of a kernel call as MLIR text (the ``.ttir`` a compiler reads)."""
    context = ir.Context()
    dialect.register_dialect(context)
    with context:
        return str(ir.Module.parse(call.ir))


@dataclasses.dataclass(frozen=True)
class TritonBuild:
    """ptxas's account of one kernel compiled for an NVIDIA architecture.

    Attributes:
      name: kernel name; arch: e.g. ``"sm_90a"``.
      registers: per thread (the hardware limit is 255).
      spill_stores, spill_loads: bytes spilled to local memory per thread.
      shared_bytes: shared memory per program, from Triton's metadata.
      num_warps, num_stages: launch parameters the kernel was compiled with.
    """

    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int
    num_stages: int


_COMPILE_SCRIPT = r"""
import json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget

path, capability, num_warps, num_stages, arch = sys.argv[1:6]
kernel = triton.compile(path, target=GPUTarget("cuda", int(capability), 32),
                        options={"num_warps": int(num_warps), "num_stages": int(num_stages)})
ptx = path + ".ptx"
with open(ptx, "w") as f:
    f.write(kernel.asm["ptx"])
try:  # the ptxas Triton itself used (its PTX may be too new for the legacy one)
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(int(capability)).path
except ImportError:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
report = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", ptx, "-o", ptx + ".cubin"],
                        capture_output=True, text=True)
if report.returncode:
    sys.exit("ptxas failed: " + report.stdout + report.stderr)
print(json.dumps({"shared": kernel.metadata.shared, "ptxas": report.stderr}))
"""


def compile_triton(call: KernelCall, *, capability: int = 90, python: str | None = None,
                   timeout: float = 900) -> TritonBuild:
    """Compiles a Triton kernel to a cubin with the ``triton`` package; no GPU needed.

    Runs in a subprocess (``python``, default this interpreter) because the
    ``triton`` package and jaxlib each carry their own LLVM.

    Raises:
      RuntimeError: the compile failed; the message holds the compiler's output.
    """
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{call.name}.ttir")
        with open(path, "w") as f:
            f.write(triton_text(call))
        env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
        done = subprocess.run(
            [python or sys.executable, "-c", _COMPILE_SCRIPT, path, str(capability),
             str(call.num_warps), str(call.num_stages), arch],
            capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(f"Triton compile of {call.name} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = result["ptxas"]

    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return TritonBuild(
        name=call.name, arch=arch, registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"), shared_bytes=int(result["shared"]),
        num_warps=call.num_warps, num_stages=call.num_stages)


def triton_available(python: str | None = None) -> bool:
    """Whether ``python`` (default this interpreter) can import ``triton``."""
    done = subprocess.run([python or sys.executable, "-c", "import triton"],
                          capture_output=True, timeout=300)
    return done.returncode == 0


def tpu_topology(name: str = "v5e:2x2"):
    """A compile-only TPU topology (needs libtpu: ``pip install "jax[tpu]"``)."""
    return topologies.get_topology_desc(platform="tpu", topology_name=name)


def compile_tpu(case: Case, topology) -> dict:
    """Compiles the case for the first chip of a compile-only TPU topology.

    Returns:
      dict with the compiled executable's memory analysis in bytes
      (``argument``, ``output``, ``temp``), or ``{}`` where it reports none.
    """
    mesh = jax.sharding.Mesh(topology.devices[:1], ("chip",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in case.args)
    with _platform.lowering_for("tpu"):
        compiled = jax.jit(_fresh(case.fn)).trace(*args).lower().compile()
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    return {
        "argument": int(memory.argument_size_in_bytes),
        "output": int(memory.output_size_in_bytes),
        "temp": int(memory.temp_size_in_bytes),
    }
