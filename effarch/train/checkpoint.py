"""Checkpoints (orbax), the run's saved configuration, and loading a run back.

A workdir holds ``config.json`` (the model and train configs of the run),
``checkpoints/<step>/`` (orbax, the most recent ``keep`` of them) and the
metrics. Starting a run in a workdir that holds another configuration raises
a ValueError naming every differing field, before anything is written, so a
saved run is never overwritten by a different one. A field the saved file
lacks (the config class gained it after the run was saved) counts as its
default, so adding an optional field never stops an old run from resuming. The train state is saved
with the step it reached; the data order and randomness are functions of
(seed, step), so restoring the latest checkpoint continues the run exactly.

:func:`load_run` reads a language-model run (experiments/train_lm.py) back
for inference: its configs and the parameters of one checkpoint, without the
optimiser state.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from effarch.models import LM, LMConfig
from effarch.train.config import TrainConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# The field of the saved train state (``loop.TrainState``) that holds the model's parameters.
PARAMS_FIELD = "params"


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


def with_defaults(saved: Any, config: Any) -> Any:
    """``saved`` (JSON of ``config``'s class) with every field it lacks set to the class's default.

    Recurses into fields whose current value is itself a dataclass (e.g.
    ``LMConfig.moe``) and into mappings of configs; a required field (no
    default) that is absent stays absent.
    """
    if isinstance(config, Mapping) and isinstance(saved, dict):
        return {k: with_defaults(v, config[k]) if k in config else v for k, v in saved.items()}
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type) and isinstance(saved, dict)):
        return saved
    filled = dict(saved)
    for f in dataclasses.fields(config):
        if f.name in filled:
            filled[f.name] = with_defaults(filled[f.name], getattr(config, f.name))
        elif f.default is not dataclasses.MISSING:
            filled[f.name] = to_json(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            filled[f.name] = to_json(f.default_factory())
    return filled


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

    A field absent from the saved file compares as the field's default (a
    field added to the config class since the run was saved).

    Raises:
      ValueError: the saved configuration differs, naming each differing field.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    current = to_json(configs)
    if path.exists():
        saved = with_defaults(json.loads(path.read_text()), configs)
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

    def all_steps(self) -> list[int]:
        """The steps of every complete checkpoint, in increasing order."""
        return sorted(self._manager.all_steps())

    def _step(self, step: int | None) -> int:
        """``step``, or the newest one when None, checked to be saved."""
        saved = self.all_steps()
        if not saved:
            raise ValueError(f"no checkpoint in {self.directory} to restore.")
        if step is None:
            return saved[-1]
        if step not in saved:
            raise ValueError(f"step={step!r} has no checkpoint in {self.directory}; saved steps: {saved}.")
        return step

    def restore(self, template):
        """The newest checkpoint, laid out like ``template`` (its shapes, dtypes and shardings)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self._manager.restore(self._step(None), args=ocp.args.StandardRestore(abstract))

    def restore_params(self, template, *, step: int | None = None):
        """Only the parameters of checkpoint ``step`` (default: the newest); the optimiser state is not read.

        Args:
          template: the parameter tree, as arrays or ``jax.ShapeDtypeStruct``
            with shardings: each leaf's shape, dtype and placement.
          step: the checkpoint's step.

        Returns:
          The saved ``params`` of the train state, laid out like ``template``.

        Raises:
          ValueError: no checkpoint is saved, or none at ``step`` (the message lists the saved steps).
        """
        item = {PARAMS_FIELD: jax.tree.map(ocp.utils.to_shape_dtype_struct, template)}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        return self._manager.restore(self._step(step), args=args)[PARAMS_FIELD]

    def save(self, step: int, state) -> None:
        """Saves ``state`` as checkpoint ``step`` (asynchronously; see :meth:`wait`)."""
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        """Blocks until every save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class SavedRun(NamedTuple):
    """A language-model run read back by :func:`load_run`.

    Attributes:
      model_config: the run's ``LMConfig``.
      train_config: the run's ``TrainConfig``.
      params: the parameters saved at ``step``; the model is
        ``LM(config=model_config)`` and its variables ``{"params": params}``.
      step: the step of the checkpoint read.
    """

    model_config: LMConfig
    train_config: TrainConfig
    params: Any
    step: int


def load_run(workdir: pathlib.Path | str, *, step: int | None = None) -> SavedRun:
    """Reads a language-model run (e.g. of experiments/train_lm.py) for inference.

    The parameters go to the default device; the optimiser state is not read.

    Args:
      workdir: the run's folder, holding ``config.json`` and ``checkpoints/``.
      step: the checkpoint to read; None: the newest complete one.

    Returns:
      The run's configs, the parameters of that checkpoint, and its step.

    Raises:
      FileNotFoundError: ``workdir`` or its ``config.json`` does not exist.
      ValueError: the run has no checkpoint yet, or none at ``step``.
    """
    workdir = pathlib.Path(workdir)
    expected = "expected the --workdir of a training run (a folder holding config.json and checkpoints/)"
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; {expected}.")
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"workdir {str(workdir)!r} has no {CONFIG_FILE}; {expected}.")
    saved = json.loads(config_path.read_text())
    model_config = LMConfig.from_dict(saved["model"])
    # JSON has lists where the dataclass has tuples (data, mesh).
    train_config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["train"].items()})
    not_yet = (f"workdir {str(workdir)!r} has no checkpoint yet; a run saves one every "
               f"ckpt_every={train_config.ckpt_every} steps (0: none) and at its end.")
    if not (workdir / CHECKPOINT_DIR).is_dir():
        raise ValueError(not_yet)
    lm = LM(config=model_config)
    tokens = jnp.zeros((1, train_config.seq_len), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(lambda key: lm.init(key, tokens)["params"], jax.random.key(0)))
    placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placement), shapes)
    checkpoints = Checkpoints(workdir, keep=train_config.keep_checkpoints)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise ValueError(not_yet)
        params = checkpoints.restore_params(template, step=step)
    finally:
        checkpoints.close()
    return SavedRun(model_config=model_config, train_config=train_config, params=params, step=step)
