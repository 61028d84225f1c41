"""effarch._xla_workarounds: the YNN-fusion crash of jaxlib 0.10.2 / 0.11.x is avoided on import."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from effarch import _xla_workarounds

# jax-ml/jax#40412's reproducer: an f32 multiply-reduce over rank-7 operands with a size-1 axis.
REPRO = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    if "effarch" in sys.argv:
        import effarch  # noqa: F401
    x = np.arange(3 * 2 * 2 * 8 * 8 * 8, dtype=np.float32).reshape(3, 1, 2, 2, 8, 8, 8) / 1000
    y = jax.jit(lambda a, b: jnp.sum(a * b, axis=3))(x, x)
    np.save(sys.argv[1], np.asarray(y))
""")


def test_importing_effarch_avoids_the_ynn_fusion_crash(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EFFARCH_KEEP_XLA_FLAGS")}
    out = tmp_path / "y.npy"
    proc = subprocess.run([sys.executable, "-c", REPRO, str(out), "effarch"],
                          env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = np.arange(3 * 2 * 2 * 8 * 8 * 8, dtype=np.float32).reshape(3, 1, 2, 2, 8, 8, 8) / 1000
    np.testing.assert_allclose(np.load(out), np.sum(x * x, axis=3), rtol=1e-5)


def _apply_with(monkeypatch, flags, version=(0, 10, 2)):
    monkeypatch.setattr(_xla_workarounds, "_jaxlib_version", lambda: version)
    monkeypatch.setattr(_xla_workarounds, "_backend_started", lambda: False)
    monkeypatch.delenv("EFFARCH_KEEP_XLA_FLAGS", raising=False)
    if flags is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", flags)
    return _xla_workarounds.apply(), os.environ.get("XLA_FLAGS")


def test_flag_goes_first_and_user_choices_are_kept(monkeypatch):
    flag = f"{_xla_workarounds.YNN_FLAG}={_xla_workarounds.YNN_VALUE}"
    # First: XLA stops reading XLA_FLAGS at a word that is not a --flag (the suite's own setting has one).
    assert _apply_with(monkeypatch, "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") == (
        True, f"{flag} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    assert _apply_with(monkeypatch, None) == (True, flag)
    own = f"{_xla_workarounds.YNN_FLAG}=dot"
    assert _apply_with(monkeypatch, own) == (False, own)  # the user's own value
    assert _apply_with(monkeypatch, "", version=(0, 10, 1)) == (False, "")  # before the regression
    assert _apply_with(monkeypatch, "", version=(0, 12, 0)) == (False, "")  # assumed fixed
    monkeypatch.setenv("EFFARCH_KEEP_XLA_FLAGS", "1")
    assert _xla_workarounds.apply() is False


def test_too_late_warns(monkeypatch):
    monkeypatch.setattr(_xla_workarounds, "_jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.setattr(_xla_workarounds, "_backend_started", lambda: True)
    monkeypatch.delenv("EFFARCH_KEEP_XLA_FLAGS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(RuntimeWarning, match="could not be set; import effarch first"):
        assert _xla_workarounds.apply() is False
    assert os.environ["XLA_FLAGS"] == ""
