"""Numerical agreement helpers shared by tests, the demo and benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# docs/design.md §5: relative RMS error against the float32 reference.
TOLERANCE = {"float32": 2e-3, "bfloat16": 1e-2, "float16": 1e-2}


def relative_rmse(out, ref) -> float:
    """``rmse(ref - out) / rms(ref)``, computed in float64 on the host."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: out {out.shape} vs ref {ref.shape}")
    err = np.sqrt(np.mean((out - ref) ** 2))
    scale = np.sqrt(np.mean(ref**2))
    if scale == 0.0:
        return float(err)
    return float(err / scale)


def tolerance(dtype) -> float:
    """The docs/design.md §5 tolerance for inputs of ``dtype``."""
    return TOLERANCE[jnp.dtype(dtype).name]


def assert_relative_close(out, ref, dtype=jnp.float32, name: str = "output") -> None:
    """Asserts finite values and relative RMS error within the dtype's tolerance.

    Works on pytrees: every leaf pair is compared and named in the message.
    """
    tol = tolerance(dtype)
    out_leaves, out_tree = jax.tree_util.tree_flatten_with_path(out)
    ref_leaves, ref_tree = jax.tree_util.tree_flatten_with_path(ref)
    if len(out_leaves) != len(ref_leaves):
        raise AssertionError(f"{name}: tree structures differ: {out_tree} vs {ref_tree}")
    for (path, o), (_, r) in zip(out_leaves, ref_leaves):
        where = name + jax.tree_util.keystr(path)
        o_np = np.asarray(jnp.asarray(o, jnp.float32))
        if not np.all(np.isfinite(o_np)):
            raise AssertionError(f"{where}: non-finite values")
        err = relative_rmse(o, r)
        if not err <= tol:
            raise AssertionError(f"{where}: relative RMS error {err:.3e} > {tol:.1e}")


def outputs_and_grads(fn, inputs: dict, seed: int = 1):
    """``fn(inputs)``'s outputs and the gradient of a random projection of all of them wrt every input.

    Args:
      fn: ``dict of arrays -> tuple of arrays``.
      inputs: the arrays (every one is differentiated).
      seed: seeds the projection weights, the same for two functions of equal output shapes.
    """
    out_shapes = jax.eval_shape(fn, inputs)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(out_shapes))
    weights = [jax.random.normal(k, s.shape) for k, s in zip(keys, out_shapes)]

    def loss(inputs):
        outputs = fn(inputs)
        value = sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(outputs, weights))
        return value, outputs

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(inputs)
    return outputs, grads


def assert_matches_reference(fn, reference, inputs: dict, dtype, names=("output", "final_state")):
    """Asserts that ``fn`` and ``reference`` agree in every output and every input gradient.

    Returns:
      ``fn``'s outputs, for checks of their dtypes.
    """
    outputs, grads = outputs_and_grads(fn, inputs)
    expected, grads_ref = outputs_and_grads(reference, inputs)
    for name, out, ref in zip(names, outputs, expected):
        if tuple(out.shape) != tuple(ref.shape):
            raise AssertionError(f"{name}: shape {tuple(out.shape)}; the reference's is {tuple(ref.shape)}")
        assert_relative_close(out, ref, dtype, name)
    if set(grads) != set(inputs):
        raise AssertionError(f"gradients for {sorted(grads)}; expected every input {sorted(inputs)}")
    assert_relative_close(grads, grads_ref, dtype, "grad")
    return outputs


def descent_losses(model, params, tokens, *, steps: int = 6, learning_rate: float = 0.5):
    """Next-token losses of plain gradient descent on one repeated batch.

    A smoke check that a language model learns: ``model.apply(params, tokens)``
    returns ``(logits, ...)``; the loss is the mean next-token cross-entropy.

    Returns:
      the loss before each of ``steps`` updates, as floats.
    """

    @jax.jit
    def step(params):
        def loss(p):
            logits = model.apply(p, tokens)[0][:, :-1]
            targets = tokens[:, 1:, None]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets, -1))

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)

    losses = []
    for _ in range(steps):
        value, params = step(params)
        losses.append(float(value))
    return losses


def load_experiment(name: str):
    """The script ``experiments/<name>.py`` of this checkout as a module (for its smoke tests).

    Registered in ``sys.modules`` as ``experiments_<name>`` (dataclasses look their module up
    there); a second call returns the same module, so a script's registrations run once.
    """
    import importlib.util  # pylint: disable=import-outside-toplevel
    import pathlib  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    module_name = f"experiments_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    if not path.exists():
        raise ValueError(f"no experiment script {path}; expected experiments/<name>.py in the checkout.")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
