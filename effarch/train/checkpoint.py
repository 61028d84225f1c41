"""Checkpoints (orbax) and the run's saved configuration.

A workdir holds ``config.json`` (the model and train configs of the run),
``checkpoints/<step>/`` (orbax, the most recent ``keep`` of them) and the
metrics. Starting a run in a workdir that holds another configuration raises
a ValueError naming every differing field, before anything is written, so a
saved run is never overwritten by a different one. The train state is saved
with the step it reached; the data order and randomness are functions of
(seed, step), so restoring the latest checkpoint continues the run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def to_json(value: Any) -> Any:
    """Configs to JSON-ready values: dataclasses to dicts, dtypes to names, tuples to lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return jnp.dtype(value).name
    except TypeError:
        return repr(value)


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    """``"prefix.field: saved X, now Y"`` for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            missing = "<absent>"
            out += _differences(saved.get(key, missing), current.get(key, missing), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]


def check_or_write_config(workdir: pathlib.Path | str, configs: dict[str, Any], *,
                          may_differ: dict[str, frozenset[str]], write: bool) -> None:
    """Writes ``config.json``, or checks that the one in ``workdir`` matches ``configs``.

    Args:
      workdir: the run's folder.
      configs: name -> config dataclass (e.g. ``{"model": LMConfig, "train": TrainConfig}``).
      may_differ: name -> top-level fields allowed to change between a run and its resumption.
      write: write the file if absent (False on processes other than the first).

    Raises:
      ValueError: the saved configuration differs, naming each differing field.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    current = to_json(configs)
    if path.exists():
        saved = json.loads(path.read_text())
        for name, fields in may_differ.items():
            for field in fields:
                saved.get(name, {}).pop(field, None)
                current.get(name, {}).pop(field, None)
        diffs = _differences(saved, current, "config")
        if diffs:
            raise ValueError(
                f"workdir {str(workdir)!r} holds a run with a different configuration ({path}); "
                "refusing to restore or overwrite it. Differing fields:\n  " + "\n  ".join(diffs)
                + "\nUse a new --workdir, or the saved configuration to resume."
            )
        return
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{CONFIG_FILE}.tmp")
        partial.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
        partial.replace(path)  # atomic: other processes see no file or the whole file


class Checkpoints:
    """Periodic and final saves of a train state, keeping the newest ``keep``.

    Args:
      workdir: the run's folder; checkpoints go to ``<workdir>/checkpoints``.
      keep: how many recent checkpoints to keep.
    """

    def __init__(self, workdir: pathlib.Path | str, *, keep: int):
        directory = (pathlib.Path(workdir) / CHECKPOINT_DIR).absolute()
        self._manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )
        self.directory = directory

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def restore(self, template):
        """The newest checkpoint, laid out like ``template`` (its shapes, dtypes and shardings)."""
        step = self.latest_step()
        if step is None:
            raise ValueError(f"no checkpoint in {self.directory} to restore.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def save(self, step: int, state) -> None:
        """Saves ``state`` as checkpoint ``step`` (asynchronously; see :meth:`wait`)."""
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        """Blocks until every save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

