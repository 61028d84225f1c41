"""effarch: efficient sequence architectures in JAX/Flax.

Every mixer is one gated linear recurrence computed several ways (recurrent,
quadratic, chunked, Pallas kernels); see docs/theory.md.
"""

from effarch import _xla_workarounds

_xla_workarounds.apply()

__version__ = "0.1.0"
