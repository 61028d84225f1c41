"""Metrics: a JSONL file (the record), TensorBoard when installed, a progress line.

``metrics.jsonl`` in the workdir holds one JSON object per line: training lines
``{"step", "time", "loss", "lr", "grad_norm", "tokens_per_s", "step_s", <aux scalars>}``
and evaluation lines ``{"step", "time", "eval_loss", "eval_bpb"}`` (``time``: UTC,
ISO 8601). A resumed run first drops the lines past the checkpoint it restored,
so the file reads as if the run had never stopped. TensorBoard event files go to
``<workdir>/tb`` when ``tensorboardX`` (the ``experiments`` extra) or
TensorFlow's summary writer via ``flax.metrics.tensorboard`` is importable;
otherwise the JSONL is the only record. The event writer opens on the first
value written (a rerun of a finished run leaves no empty event file), and a
resumed run purges the old events past its checkpoint (tensorboardX's
``purge_step``), so TensorBoard shows each step once.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import pathlib
from typing import Any


METRICS_FILE = "metrics.jsonl"

_log = logging.getLogger("effarch.train")


def _tensorboard_writer(logdir: pathlib.Path, purge_step: int | None):
    """A writer with ``scalar(tag, value, step)``, or None when no backend is importable.

    ``purge_step``: events of earlier runs at this step or later are hidden
    (tensorboardX only; TensorFlow's writer keeps them).
    """
    try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        writer = SummaryWriter(str(logdir), purge_step=purge_step)

        class _Writer:
            def scalar(self, tag, value, step):
                writer.add_scalar(tag, value, step)

            def flush(self):
                writer.flush()

            def close(self):
                writer.close()

        return _Writer()
    except ImportError:
        pass
    try:
        from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel

        return tensorboard.SummaryWriter(str(logdir))
    except ImportError:
        _log.info("no tensorboardX or TensorFlow: metrics go to %s only", METRICS_FILE)
        return None


def read_jsonl(path: pathlib.Path | str) -> list[dict[str, Any]]:
    """Every line of a metrics file as a dict (an empty list if there is none)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` (and TensorBoard) from the main process.

    Args:
      workdir: the run's folder.
      start_step: the step the run (re)starts from; lines with a larger step are dropped.
      enabled: False on processes other than the first, which write nothing.
    """

    def __init__(self, workdir: pathlib.Path | str, *, start_step: int, enabled: bool = True):
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        self._tb_opened = False
        self._start_step = start_step
        if not enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        """One JSONL line ``{"step", "time", **values}`` and one TensorBoard scalar per value."""
        if not self.enabled:
            return
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"step": int(step), "time": now, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not self._tb_opened:
            self._tb_opened = True
            self._tb = _tensorboard_writer(self.path.parent / "tb",
                                           purge_step=self._start_step + 1 if self._start_step else None)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.scalar(key, float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def bits_per_byte(loss_nats: float) -> float:
    """Cross-entropy in nats per byte -> bits per byte."""
    return loss_nats / math.log(2.0)


def format_duration(seconds: float) -> str:
    """``3725 -> "1h02m"``, ``125 -> "2m05s"``, ``7.5 -> "7.5s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def progress_line(step: int, steps: int, values: dict[str, float]) -> str:
    """``"step 120/600  loss 2.1034  bpb 3.035  lr 2.9e-03  gnorm 0.41  12.3k tok/s  85 ms/step  ETA 41s"``.

    The step time and ETA appear when ``values`` has ``step_s`` (seconds per step).
    """
    parts = [f"step {step}/{steps}"]
    if "loss" in values:
        parts += [f"loss {values['loss']:.4f}", f"bpb {bits_per_byte(values['loss']):.3f}"]
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if "grad_norm" in values:
        parts.append(f"gnorm {values['grad_norm']:.3f}")
    if "tokens_per_s" in values:
        parts.append(f"{values['tokens_per_s'] / 1e3:.1f}k tok/s")
    if "step_s" in values:
        parts += [f"{values['step_s'] * 1e3:.0f} ms/step", f"ETA {format_duration(values['step_s'] * (steps - step))}"]
    if "eval_loss" in values:
        parts += [f"eval_loss {values['eval_loss']:.4f}", f"eval_bpb {values['eval_bpb']:.3f}"]
    return "  ".join(parts)
