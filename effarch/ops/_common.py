"""What every op's XLA forms share: the implementation choice, and segment sums.

``implementation`` (``"auto"`` included) is resolved here, in one place, so
layers stay free of grids and BlockSpecs (docs/design.md §2). What an op and
its kernel both need (input checks, segment flags, padding, ``MASKED_LOG``)
is in ``effarch.op_contract``, below both.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from effarch.op_contract import MASKED_LOG

_log = logging.getLogger("effarch.ops")

# Every implementation name any op accepts; each op supports a subset.
IMPLEMENTATIONS = ("auto", "recurrent", "quadratic", "chunked", "pallas", "xla", "cudnn")


def platform() -> str:
    """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


# The longest chunk "auto" runs on CPU in the chunked forms of linear_attention (scalar or no
# decay: Mamba-2's SSD, RetNet, mLSTM) and delta_rule. The chunk length changes only the order of
# summation; on CPU C = 32 was the fastest with gradients: 29-32% faster than C = 64 at Mamba-2's
# shapes, 1.3-1.5x at Qwen3-Next's (docs/results/speed.md, sessions 7 and 10).
CPU_CHUNK_SIZE = 32


def auto_chunk_size(implementation: str, chunk_size: int) -> int:
    """``chunk_size``, capped at :data:`CPU_CHUNK_SIZE` for ``"auto"`` on CPU (an explicit form keeps it)."""
    if implementation == "auto" and platform() == "cpu":
        return min(chunk_size, CPU_CHUNK_SIZE)
    return chunk_size


def check_implementation(op: str, implementation: str, supported: Sequence[str]) -> None:
    """Unknown names list the valid ones; known but unsupported ones say so."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: unknown implementation={implementation!r}; valid: "
            f"{', '.join(repr(s) for s in supported)}."
        )
    if implementation not in supported:
        raise NotImplementedError(
            f"{op} has no implementation={implementation!r}; it supports "
            f"{', '.join(repr(s) for s in supported)}."
        )


@functools.cache
def log_once(message: str) -> None:
    """Logs ``message`` once per process (for 'auto' fallbacks)."""
    _log.warning(message)


# Platforms on which each op's Pallas kernel has been compiled, checked and
# measured faster than its XLA chunked form; "auto" picks "pallas" only there.
# Empty: the kernels are verified in interpret mode only so far (no GPU/TPU run).
VERIFIED_KERNELS: dict[str, tuple[str, ...]] = {}

# The ops with a Pallas kernel ("pallas" in their implementations).
KERNEL_OPS = ("linear_attention", "selective_scan", "linear_scan")


class Choice(NamedTuple):
    """The forms ``"auto"`` runs: ``forward`` when no gradient is taken, else ``training``."""

    forward: str
    training: str


# docs/design.md §3, "The auto policy": the fastest form on CPU, forward only
# and forward+backward, as measured by benchmarks/auto_policy.py
# (docs/results/auto_policy/). Every CPU entry is backed by a row there.
CPU_POLICY: dict[str, Choice] = {
    "linear_scan": Choice(forward="recurrent", training="recurrent"),
    "selective_scan": Choice(forward="recurrent", training="chunked"),
    "linear_attention": Choice(forward="recurrent", training="chunked"),
    "delta_rule": Choice(forward="recurrent", training="chunked"),
    "generalized_delta_rule": Choice(forward="recurrent", training="chunked"),
}


def auto_policy(op: str, platform_name: str) -> Choice:
    """What ``implementation="auto"`` runs for ``op`` on ``platform_name``.

    CPU: the measured ``CPU_POLICY``. GPU/TPU: ``"pallas"`` where
    ``VERIFIED_KERNELS[op]`` lists the platform, else the XLA ``"chunked"``
    form for both uses (no form has been timed on a device yet), logging once
    why an op with a kernel did not get it.
    """
    if platform_name == "cpu":
        return CPU_POLICY[op]
    if platform_name in VERIFIED_KERNELS.get(op, ()):
        return Choice("pallas", "pallas")
    if op in KERNEL_OPS:
        log_once(
            f"{op}(implementation='auto') uses the XLA chunked form on {platform_name}: "
            "its Pallas kernel is verified in interpret mode only; pass "
            "implementation='pallas' to use it.")
    return Choice("chunked", "chunked")


def resolve_forms(op: str, implementation: str, supported: Sequence[str]) -> Choice:
    """Validates ``implementation``; ``"auto"`` becomes this platform's :func:`auto_policy`.

    An explicit name runs that form whether or not a gradient is taken.
    """
    check_implementation(op, implementation, supported)
    if implementation == "auto":
        return auto_policy(op, platform())
    return Choice(implementation, implementation)


def run_forms(choice: Choice, form: Callable[[str], Callable], *args):
    """Runs ``form(choice.forward)(*args)``, differentiated as ``form(choice.training)``.

    When the two forms differ, a ``jax.custom_vjp`` holds them together: a call
    that is not differentiated (no ``jax.grad``/``jax.vjp`` around it, inside
    ``jit`` or not) traces only the forward form; under differentiation JAX
    calls the rule ``fwd``, which runs the training form and keeps its VJP, so
    the values and gradients are exactly the training form's. Forward-mode
    (``jax.jvp``) is not supported by such a call.

    Args:
      choice: the two forms.
      form: maps a form's name to a function of ``args`` (pytrees of arrays or
        None; static options are bound inside it).
      args: the arrays.
    """
    if choice.forward == choice.training:
        return form(choice.forward)(*args)
    forward, training = form(choice.forward), form(choice.training)

    @jax.custom_vjp
    def call(*args):
        return forward(*args)

    def fwd(*args):
        return jax.vjp(training, *args)  # (outputs, VJP function: a pytree of residuals)

    def bwd(vjp, cotangents):
        return vjp(cotangents)

    call.defvjp(fwd, bwd)
    return call(*args)


def resolve_implementation(
    op: str,
    implementation: str,
    supported: Sequence[str],
    auto: Callable[[str], str],
) -> str:
    """Validates ``implementation`` and resolves ``"auto"`` by platform.

    Args:
      op: the op's name, for messages.
      implementation: what the caller asked for.
      supported: the names this op accepts (``"auto"`` included).
      auto: maps the platform (``"cpu"``, ``"gpu"``, ``"tpu"``) to a concrete name.
    """
    check_implementation(op, implementation, supported)
    if implementation == "auto":
        return auto(platform())
    return implementation


def segsum(x: jax.Array) -> jax.Array:
    """Stable segment sums along the last axis: ``out[..., t, s] = sum x[..., s+1:t+1]``.

    Entries with ``s > t`` are ``MASKED_LOG``. Summing a masked copy (rather than
    differencing one long cumsum) keeps full float32 precision when the
    cumulative log decay is large (Mamba-2, "segsum").

    Args:
      x: ``[..., T]`` log decays.
    Returns:
      ``[..., T, T]`` with rows t and columns s.
    """
    t = x.shape[-1]
    rep = jnp.broadcast_to(x[..., :, None], (*x.shape[:-1], t, t))  # [..., r, s] = x[r]
    strictly_lower = jnp.tril(jnp.ones((t, t), bool), -1)  # r > s
    # out[t, s] = sum_{r=s+1..t} x[r]: cumsum over r of x[r] masked to r > s.
    out = jnp.cumsum(jnp.where(strictly_lower, rep, 0.0), axis=-2)  # [..., t, s]
    lower = jnp.tril(jnp.ones((t, t), bool))
    return jnp.where(lower, out, MASKED_LOG)
