"""The training loop: a jitted, sharded step with microbatches; evaluation; resumption.

The model is any flax module with the LM contract
``logits [B,T,V], aux, cache = model.apply(variables, tokens, segment_ids=...)``
where ``aux["aux_loss"]`` is a scalar added to the loss (MoE balance losses)
and every other scalar of ``aux`` is logged. One update:

1. splits the global batch ``[B,T]`` into ``grad_accum`` microbatches of
   ``B / grad_accum`` rows (each still sharded over data x fsdp);
2. scans over them, summing the gradients of
   ``sum(masked cross-entropy) / tokens_in_batch + aux_loss / grad_accum``
   in float32, so memory stays that of one microbatch and the result equals
   the full-batch gradient;
3. applies the optimiser (clipping, AdamW).

Step ``s`` (0-based) trains on ``dataset.batch(s)`` with randomness
``fold_in(key(seed), s)``, so a run restored at step ``s`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import shutil
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from effarch.data import Dataset, check_batch
from effarch.train import checkpoint as ckpt_lib
from effarch.train import metrics as metrics_lib
from effarch.train import optim, sharding
from effarch.train.config import TrainConfig

_log = logging.getLogger("effarch.train")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds.

    Attributes:
      step: updates done so far (int32 scalar).
      params: the model's parameters (unboxed: plain arrays).
      opt_state: the optimiser's state.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy, in float32.

    Args:
      logits: ``[B,T,V]``.
      targets: ``int [B,T]``.
      mask: ``float [B,T]``, 1 where the target counts.

    Returns:
      ``(sum of -log p(target) over masked positions, number of masked positions)``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(nll * mask), jnp.sum(mask)


def count_params(params) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def _microbatches(batch: dict[str, jax.Array], grad_accum: int) -> dict[str, jax.Array]:
    """``[B,T]`` -> ``[A, B/A, T]``; microbatch ``a`` takes rows ``a, a+A, ...`` so each stays sharded."""

    def split(x):
        b, t = x.shape
        x = x.reshape(b // grad_accum, grad_accum, t).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, P(None, sharding.BATCH_AXES))

    return {k: split(v) for k, v in batch.items()}


def _check_aux(aux: dict[str, jax.Array]) -> None:
    if "aux_loss" not in aux:
        raise ValueError(f"model aux has keys {sorted(aux)}; expected 'aux_loss' (a scalar, 0 if unused).")
    shapes = {k: tuple(v.shape) for k, v in aux.items() if jnp.ndim(v) != 0}
    if shapes:
        raise ValueError(f"model aux entries must be scalars; got shapes {shapes}.")


def _exit_weights(model: nn.Module) -> jax.Array | None:
    """Loss weights of a model's exits (``LMConfig.exit_weights``), or None for a model without early exits."""
    config = getattr(model, "config", None)
    if not getattr(config, "early_exit", ()):
        return None
    return jnp.asarray(config.exit_weights, jnp.float32)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, config: TrainConfig,
                    schedule: optax.Schedule) -> Callable:
    """``(state, batch) -> (state, metrics)`` for one update; jit it with shardings.

    Metrics: ``loss`` (mean masked cross-entropy, nats per token), ``lr``,
    ``grad_norm`` (before clipping), ``total_loss`` (with aux) and every aux scalar.

    A model with early exits (``model.config.early_exit``) is trained on the
    weighted sum of its exits' losses (``config.exit_weights``); ``loss`` is
    then the final exit's, ``exit_<k>_loss`` each early exit's, and
    ``total_loss`` the weighted objective plus aux.
    """
    base_key = jax.random.key(config.seed)
    accum = config.grad_accum
    exit_weights = _exit_weights(model)

    def step_fn(state: TrainState, batch):
        tokens_in_batch = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        step_key = jax.random.fold_in(base_key, state.step)

        def loss_fn(params, micro, key):
            if exit_weights is None:
                logits, aux, _ = model.apply(
                    {"params": params}, micro["tokens"], segment_ids=micro["segment_ids"], rngs={"dropout": key}
                )
                _check_aux(aux)
                nll_sum, _ = cross_entropy(logits, micro["targets"], micro["loss_mask"])
                objective = nll_sum
            else:  # early exits: CALM's weighted sum of every exit's loss; "loss" stays the final exit's
                logits, aux, _ = model.apply(
                    {"params": params}, micro["tokens"], segment_ids=micro["segment_ids"], exits=True,
                    rngs={"dropout": key},
                )
                _check_aux(aux)
                nll_sums = jnp.stack([cross_entropy(lg, micro["targets"], micro["loss_mask"])[0] for lg in logits])
                nll_sum, objective = nll_sums[-1], jnp.sum(exit_weights * nll_sums)
                aux = {**aux, **{f"exit_{k}_loss": nll_sums[k] / tokens_in_batch * accum
                                 for k in range(len(exit_weights) - 1)}}
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
            return objective / tokens_in_batch + aux["aux_loss"] / accum, (nll_sum, aux)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(grads_sum, inputs):
            micro, index = inputs
            (_, (nll_sum, aux)), grads = grad_fn(state.params, micro, jax.random.fold_in(step_key, index))
            return jax.tree.map(jnp.add, grads_sum, grads), (nll_sum, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        micro = _microbatches(batch, accum)
        grads, (nll_sums, aux) = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
        aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)  # [A] -> mean over microbatches
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = jnp.sum(nll_sums) / tokens_in_batch
        objective = loss
        if exit_weights is not None:
            exit_losses = jnp.stack([aux[f"exit_{k}_loss"] for k in range(len(exit_weights) - 1)] + [loss])
            objective = jnp.sum(exit_weights * exit_losses)
        metrics = {
            "loss": loss,
            "total_loss": objective + aux["aux_loss"],
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            **aux,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


def make_eval_step(model: nn.Module) -> Callable:
    """``(params, batch) -> (sum of masked cross-entropy, count)``."""

    def eval_fn(params, batch):
        logits, _, _ = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"])
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])

    return eval_fn


def _check_init_params(given: Any, expected: Any) -> None:
    """Raises a ValueError naming the first parameter whose path, shape or dtype differs from the model's."""
    given = nn.unbox(given)
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(given)[0]}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"init_params do not match the model: missing {missing[:5]}, unexpected {extra[:5]} "
                         f"({len(missing)} missing, {len(extra)} unexpected); expected the tree of model.init.")
    for path, leaf in want.items():
        if tuple(got[path].shape) != tuple(leaf.shape) or jnp.dtype(got[path].dtype) != jnp.dtype(leaf.dtype):
            raise ValueError(f"init_params{path} has shape {tuple(got[path].shape)} and dtype {got[path].dtype}; "
                             f"the model expects {tuple(leaf.shape)} {jnp.dtype(leaf.dtype)}.")


def _remove_unstarted_run(workdir: pathlib.Path) -> None:
    """Deletes what a run that never finished a step wrote: its config, metrics, events, empty checkpoints."""
    for name in (ckpt_lib.CONFIG_FILE, metrics_lib.METRICS_FILE):
        (workdir / name).unlink(missing_ok=True)
    for name in ("tb", ckpt_lib.CHECKPOINT_DIR):
        if (workdir / name).is_dir():
            shutil.rmtree(workdir / name)
    if workdir.is_dir() and not any(workdir.iterdir()):
        workdir.rmdir()


@dataclasses.dataclass
class Trainer:
    """A model, its data and a workdir, set up to train on a mesh and resume.

    Build it with :func:`Trainer.create`; :meth:`run` trains to ``config.steps``.
    """

    model: nn.Module
    config: TrainConfig
    train_data: Dataset
    eval_data: Dataset | None
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    state: TrainState
    checkpoints: ckpt_lib.Checkpoints
    writer: metrics_lib.MetricsWriter
    train_step: Callable
    eval_step: Callable
    batch_sharding: NamedSharding
    num_params: int

    @classmethod
    def create(cls, *, model: nn.Module, model_config: Any, config: TrainConfig, train_data: Dataset,
               eval_data: Dataset | None, workdir: str | pathlib.Path, init_params: Any = None) -> "Trainer":
        """Checks the workdir's saved config, builds the mesh and state, restores the latest checkpoint.

        Args:
          model: a flax module with the LM contract (module docstring).
          model_config: its config dataclass, saved beside the checkpoints and
            compared on resumption.
          config: the training configuration.
          train_data: yields global batches ``[config.batch_size, config.seq_len]``.
          eval_data: held-out batches of the same shape, or None.
          workdir: where config, checkpoints and metrics live.
          init_params: parameters to start a fresh run from (e.g. converted by
            ``effarch.convert.from_hf``, or another run's from ``load_run``),
            the same tree, shapes and dtypes as ``model.init`` makes; None:
            initialise from ``config.seed``. A run that resumes from its own
            checkpoint ignores them.

        Raises:
          ValueError: the workdir holds a run with another configuration, the
            batch does not split over the mesh, or the data has the wrong shape.
        """
        workdir = pathlib.Path(workdir)
        is_main = jax.process_index() == 0
        fresh = not (workdir / ckpt_lib.CONFIG_FILE).exists()
        try:
            return cls._create(model=model, model_config=model_config, config=config, train_data=train_data,
                               eval_data=eval_data, workdir=workdir, is_main=is_main, given=init_params)
        except BaseException:
            if fresh and is_main:
                _remove_unstarted_run(workdir)
            raise

    @classmethod
    def _create(cls, *, model, model_config, config, train_data, eval_data, workdir, is_main,
                given) -> "Trainer":
        for name, ds in (("train_data", train_data), ("eval_data", eval_data)):
            if ds is not None and (ds.batch_size, ds.seq_len) != (config.batch_size, config.seq_len):
                raise ValueError(
                    f"{name} yields [{ds.batch_size},{ds.seq_len}] batches; expected "
                    f"[batch_size,seq_len] = [{config.batch_size},{config.seq_len}] from the TrainConfig."
                )
        ckpt_lib.check_or_write_config(
            workdir, {"model": model_config, "train": config},
            may_differ={"train": TrainConfig.RESUMABLE_CHANGES}, write=is_main,
        )
        mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch_divisible(config.batch_size, config.grad_accum, mesh)
        schedule = optim.learning_rate(config)
        optimizer = optim.make_optimizer(config)
        dummy = jnp.zeros((1, config.seq_len), jnp.int32)
        init_key = jax.random.key(config.seed)

        def init_params(key):
            return model.init(key, dummy)["params"]

        def init_state(key):
            params = nn.unbox(init_params(key))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

        def given_state(params):
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

        with mesh, nn.logical_axis_rules(sharding.LOGICAL_RULES):
            specs = sharding.param_specs(jax.eval_shape(init_params, init_key), mesh)
            param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
            abstract = jax.eval_shape(init_state, init_key)
            state_sh = sharding.state_shardings(abstract, param_sh, mesh)
            checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
            start = checkpoints.latest_step()
            if given is not None and start is None:
                _check_init_params(given, abstract.params)
                state = jax.jit(given_state, out_shardings=state_sh)(nn.unbox(given))
            else:
                state = jax.jit(init_state, out_shardings=state_sh)(init_key)
            batch_sh = sharding.batch_sharding(mesh)
            replicated = NamedSharding(mesh, P())
            train_step = jax.jit(
                make_train_step(model, optimizer, config, schedule),
                in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=0,
            )
            eval_step = jax.jit(make_eval_step(model), in_shardings=(param_sh, batch_sh), out_shardings=replicated)

        if start is not None:
            state = checkpoints.restore(state)
            _log.info("resuming from step %d (checkpoint in %s)", start, checkpoints.directory)
        else:
            _log.info("starting fresh in %s%s", workdir, "" if given is None else " from the given parameters")
        writer = metrics_lib.MetricsWriter(workdir, start_step=start or 0, enabled=is_main)
        return cls(model=model, config=config, train_data=train_data, eval_data=eval_data, workdir=workdir,
                   mesh=mesh, state=state, checkpoints=checkpoints, writer=writer, train_step=train_step,
                   eval_step=eval_step, batch_sharding=batch_sh, num_params=count_params(abstract.params))

    def _device_batch(self, batch) -> dict[str, jax.Array]:
        check_batch(batch, self.config.batch_size, self.config.seq_len)
        return sharding.shard_batch(batch, self.batch_sharding)

    def evaluate(self) -> dict[str, float]:
        """Mean masked cross-entropy over ``config.eval_batches`` held-out batches, and bits per byte."""
        nll, count = 0.0, 0.0
        with self.mesh, nn.logical_axis_rules(sharding.LOGICAL_RULES):
            for i in range(self.config.eval_batches):
                s, c = self.eval_step(self.state.params, self._device_batch(self.eval_data.batch(i)))
                nll, count = nll + float(s), count + float(c)
        loss = nll / max(count, 1.0)
        return {"eval_loss": loss, "eval_bpb": metrics_lib.bits_per_byte(loss)}

    def run(self) -> list[dict[str, Any]]:
        """Trains from the current step to ``config.steps``; returns the run's metrics records."""
        cfg = self.config
        step = int(self.state.step)
        if step >= cfg.steps:
            _log.info("already finished: step %d of %d; nothing to train", step, cfg.steps)
            return metrics_lib.read_jsonl(self.writer.path) if self.writer.enabled else []
        first_step = step
        tokens_per_step = cfg.batch_size * cfg.seq_len
        _log.info("compiling the train step ...")
        last_time, last_step = time.perf_counter(), step
        while step < cfg.steps:
            batch = self._device_batch(self.train_data.batch(step))
            try:
                with self.mesh, nn.logical_axis_rules(sharding.LOGICAL_RULES):
                    self.state, metrics = self.train_step(self.state, batch)
            except BaseException:
                if step == first_step == 0 and self.writer.enabled:
                    # Nothing was trained or saved: leave no half-made run behind.
                    self.close()
                    _remove_unstarted_run(self.workdir)
                raise
            step += 1
            if step == first_step + 1:
                jax.block_until_ready(metrics)
                _log.info("compiled and ran the first step in %s", metrics_lib.format_duration(
                    time.perf_counter() - last_time))
            if step % cfg.log_every == 0 or step in (1, cfg.steps):
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["tokens_per_s"] = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
                values["step_s"] = (now - last_time) / max(step - last_step, 1)
                last_time, last_step = now, step
                self.writer.write(step, values)
                _log.info(metrics_lib.progress_line(step, cfg.steps, values))
            evaluating = self.eval_data is not None and cfg.eval_batches > 0
            if evaluating and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                values = self.evaluate()
                self.writer.write(step, values)
                _log.info(metrics_lib.progress_line(step, cfg.steps, values))
                last_time = time.perf_counter()
            if step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                self.checkpoints.save(step, self.state)
        self.checkpoints.wait()
        return metrics_lib.read_jsonl(self.writer.path) if self.writer.enabled else []

    def close(self) -> None:
        self.checkpoints.close()
        self.writer.close()
