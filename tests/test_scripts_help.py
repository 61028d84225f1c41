"""Every script's ``--help`` prints its usage, with no traceback.

argparse scripts exit 0; absl scripts exit 1 after printing their flags
(absl's own convention for ``--help``). Slow (one Python start and jax import
per script, ~15 s each on 2 cores): ``pytest -m slow tests/test_scripts_help.py``.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Library modules and helpers, not command-line scripts.
NOT_SCRIPTS = {"benchmarks/harness.py", "benchmarks/compile_check.py"}
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("benchmarks", "experiments", "docs")
                 for p in (ROOT / folder).glob("*.py") if str(p.relative_to(ROOT)) not in NOT_SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    output = done.stdout + done.stderr
    assert "Traceback" not in output, f"{script} --help crashed:\n{output[-3000:]}"
    assert done.returncode in (0, 1), f"{script} --help exited {done.returncode}:\n{output[-2000:]}"
    assert "usage:" in output or "flags:" in output, output[:1000]
