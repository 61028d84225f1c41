"""The README's Python code runs as written."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_code():
    assert python_blocks(), f"no ```python block in {README}"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs(index):
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), namespace)  # pylint: disable=exec-used
    # The decode step continues the prefill: its output equals the full sequence's last position.
    if {"y", "y_t"} <= namespace.keys():
        np.testing.assert_allclose(np.asarray(namespace["y_t"]), np.asarray(namespace["y"][:, -1:]),
                                   rtol=2e-3, atol=2e-3)
