"""XLA flags that avoid known XLA:CPU crashes, set before JAX starts its CPU backend.

jaxlib 0.10.2 and 0.11.x fuse some f32 multiply-reduce and dot patterns into
YNNPACK ("__ynn_fusion"), which segfaults on an Eigen worker thread for rank-7
and rank-8 operands with a size-1 dimension (jax-ml/jax#39257, #40412; fixed
in XNNPACK after those releases). effarch's chunked SSD with one group of B/C
(Mamba-2's ``ngroups=1``), vmapped over settings (``train.sweep``), builds
exactly such operands in its backward pass: ``experiments/hybrid_ratio.py
--preset cpu --tasks mqar`` died on its first step. Without YNN's reduce fusions
it runs; YNN's dot fusions stay (turning all YNN fusion off made Mamba-2's CPU
training step 9% slower). What dropping the reduce fusions does to speed
(docs/results/speed.md, sessions 9 and 10): Mamba's and Jamba's CPU steps run
2.2x faster (the selective scan); Mamba-2's and Qwen3-Next's training steps ran
12-15% slower, all of it in the LM head's weight gradient, which
``models.lm.output_logits`` now computes as one 2-D matmul (no slower either way).

``apply()`` adds ``--xla_cpu_experimental_ynn_fusion_type=-reduce`` to the front
of ``XLA_FLAGS`` unless the user set that flag. The front:
XLA stops reading ``XLA_FLAGS`` at the first word that is not a ``--flag``.
It only takes effect if no JAX backend has started yet (importing effarch
before running anything in JAX); otherwise it warns. ``EFFARCH_KEEP_XLA_FLAGS=1``
leaves ``XLA_FLAGS`` untouched (to measure XLA's defaults, or on a jaxlib that has the fix).
"""

from __future__ import annotations

import os
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "-reduce"  # drop reduce from the default fusion types
# First and last jaxlib releases known to crash; later ones are assumed fixed.
AFFECTED = ((0, 10, 2), (0, 11, 99))


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("jaxlib").split(".")[:3])
    except Exception:  # not installed, or a local build with a non-numeric version
        return None


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and getattr(bridge, "_backends", None))


def apply() -> bool:
    """Turn YNN's reduce fusions off for affected jaxlib versions; returns whether ``XLA_FLAGS`` was changed."""
    if os.environ.get("EFFARCH_KEEP_XLA_FLAGS"):
        return False
    version = _jaxlib_version()
    if version is None or not AFFECTED[0] <= version <= AFFECTED[1]:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return False  # the user chose
    if _backend_started():
        warnings.warn(f"effarch was imported after JAX started its backend, so {YNN_FLAG}={YNN_VALUE} (which avoids an "
                      f"XLA:CPU crash in jaxlib {'.'.join(map(str, version))}) could not be set; import effarch "
                      f"first or set XLA_FLAGS='{YNN_FLAG}={YNN_VALUE} ...' yourself", RuntimeWarning, stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = f"{YNN_FLAG}={YNN_VALUE} {flags}".strip()
    return True
