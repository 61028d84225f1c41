"""Timing and reporting helpers shared by the benchmark scripts.

Every benchmark prints a table and saves JSON with the device, the library
versions and the command line that produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax


def environment() -> dict:
    """Device, versions and command: the header of every benchmark JSON."""
    import flax
    import jaxlib

    devices = jax.devices()
    return {
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _commit() -> str | None:
    """The repository's ``git rev-parse HEAD``, or None outside a git checkout."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        return head or None
    except Exception:  # no git, not a checkout, timeout ...
        return None


def time_fn(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of ``fn(*args)`` (jitted by the caller), after warm-up.

    Returns ``{"median_ms", "min_ms", "compile_s"}``; the first call's time,
    compile included, is reported separately.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "compile_s": compile_s}


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Prints ``rows`` as an aligned text table of ``columns``."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (benchmarks draw PNGs, never windows)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def save_figure(fig, path: str, title: str) -> None:
    """Titles ``fig``, writes it to ``path`` as a PNG and closes it."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print(f"saved {path}")


def save_json(path: str, rows: Sequence[dict], **extra) -> None:
    """Writes ``{"environment": ..., "results": rows, **extra}`` to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **extra, "results": list(rows)}, f, indent=1)
    print(f"saved {path}")
