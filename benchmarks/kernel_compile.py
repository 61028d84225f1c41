"""Compiles every Pallas kernel for an H100 and a TPU on a machine with neither.

For each case of ``compile_check`` (beside this script: each kernel family, forward
and backward, bf16 inputs) it lowers the real kernels and compiles them:

- GPU: the Triton modules to cubins for ``sm_<capability>a`` with the
  ``triton`` package; one row per kernel with ptxas's registers per thread,
  spilled bytes, and Triton's shared memory per program.
- TPU: XLA + Mosaic for a compile-only topology (libtpu matched to jax); one
  row per case with the executable's argument, output and temporary bytes.

A failed compile is a row with its error, not a crash. Prints a table and
writes JSON with the environment and the command.

    pip install -e ".[aot]"
    python benchmarks/kernel_compile.py
    python benchmarks/kernel_compile.py --capability 90 80 --tpu-topology v5e:2x2 v6e:2x2
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_check  # noqa: E402
import harness  # noqa: E402

COLUMNS = ("case", "target", "kernel", "status", "registers", "spill_stores", "spill_loads",
           "shared_bytes", "num_warps", "temp_bytes", "output_bytes", "compile_s")


def _error(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def gpu_rows(case, capabilities, python) -> list[dict]:
    rows = []
    try:
        calls = compile_check.kernel_calls(compile_check.lower(case, "cuda"))
    except Exception as exc:  # noqa: BLE001 - a failed lowering is a result
        return [{"case": case.name, "target": "cuda", "status": _error(exc)}]
    for capability in capabilities:
        for call in calls:
            start = time.perf_counter()
            row = {"case": case.name, "target": f"sm_{capability}", "kernel": call.name}
            try:
                build = compile_check.compile_triton(call, capability=capability, python=python)
                row.update(status="ok", registers=build.registers,
                           spill_stores=build.spill_stores, spill_loads=build.spill_loads,
                           shared_bytes=build.shared_bytes, num_warps=build.num_warps)
            except Exception as exc:  # noqa: BLE001
                row["status"] = _error(exc)
            row["compile_s"] = time.perf_counter() - start
            rows.append(row)
    return rows


def tpu_rows(case, topologies) -> list[dict]:
    rows = []
    for name, topology in topologies.items():
        start = time.perf_counter()
        row = {"case": case.name, "target": name, "kernel": "fwd+bwd"}
        try:
            memory = compile_check.compile_tpu(case, topology)
            row.update(status="ok", temp_bytes=memory.get("temp"),
                       output_bytes=memory.get("output"))
        except Exception as exc:  # noqa: BLE001
            row["status"] = _error(exc)
        row["compile_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


def _compiler_versions() -> dict:
    """Versions of libtpu and triton as installed (None where absent)."""
    versions = {}
    for name in ("libtpu", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_markdown(path: str, rows: list[dict]) -> None:
    """The GPU rows and the TPU rows as two Markdown tables."""
    gpu = [r for r in rows if r["target"].startswith("sm_") or r["target"] == "cuda"]
    tpu = [r for r in rows if r not in gpu]
    tables = [
        (gpu, ("case", "target", "kernel", "status", "registers", "spill_stores",
               "spill_loads", "shared_bytes", "num_warps")),
        (tpu, ("case", "target", "status", "output_bytes", "temp_bytes")),
    ]
    lines = []
    for table, columns in tables:
        if not table:
            continue
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in table]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, nargs="*", default=[90],
                        help="NVIDIA compute capabilities (90 = H100; none to skip GPU)")
    parser.add_argument("--tpu-topology", nargs="*", default=["v5e:2x2"],
                        help="compile-only TPU topologies (none to skip TPU)")
    parser.add_argument("--triton-python", default=None,
                        help="a Python that can import triton (default: this one)")
    parser.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    parser.add_argument("--out", default="results/kernel_compile.json", help="JSON report path")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown")
    args = parser.parse_args(argv)

    cases = [c for c in compile_check.cases()
             if not args.cases or any(s in c.name for s in args.cases)]
    capabilities = args.capability
    if capabilities and not compile_check.triton_available(args.triton_python):
        print('triton is not importable: skipping GPU (pip install -e ".[aot]")')
        capabilities = []
    topologies = {}
    if args.tpu_topology and importlib.util.find_spec("libtpu") is None:
        print('libtpu is not installed: skipping TPU (pip install -e ".[aot]")')
    elif args.tpu_topology:
        topologies = {name: compile_check.tpu_topology(name) for name in args.tpu_topology}

    rows = []
    for case in cases:
        if capabilities:
            rows += gpu_rows(case, capabilities, args.triton_python)
        rows += tpu_rows(case, topologies)
    harness.print_table(rows, COLUMNS)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} compiled, {len(failed)} failed")
    harness.save_json(args.out, rows, capabilities=capabilities,
                      tpu_topologies=list(topologies), compilers=_compiler_versions())
    if args.markdown:
        write_markdown(args.markdown, rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
