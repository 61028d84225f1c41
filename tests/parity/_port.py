"""Shared pieces of the parity tests: random reference weights, porting them by name, the comparison.

A parity test builds a reference layer in torch, gives every parameter random
values (:func:`randomize_`), ports the weights into an effarch parameter tree
with the small converters below, and compares two things (:func:`check_parity`):

- the full-sequence output ``[B,T,D]``;
- the output of one decoded token after a prompt of ``T - 1`` tokens, each side
  decoding from its own cache.

Only import this module after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from effarch.testing import assert_relative_close, relative_rmse

# The parity tests run on a 2-core machine beside XLA.
torch.set_num_threads(1)

# Standard deviation of the noise added to every reference parameter: enough
# that ones and zeros of an initialisation (norm scales, zero gates) become
# generic values, small enough to keep activations O(1).
PERTURBATION_STD = 0.1


def randomize_(module: torch.nn.Module, seed: int, std: float = PERTURBATION_STD) -> torch.nn.Module:
    """Adds ``N(0, std^2)`` noise to every parameter of ``module`` in place and returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.add_(std * torch.randn(param.shape, generator=generator))
    return module.eval()


def array(tensor: torch.Tensor) -> jax.Array:
    """A torch tensor as a float32 JAX array."""
    return jnp.asarray(tensor.detach().to(torch.float32).cpu().numpy())


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, jax.Array]:
    """A ``torch.nn.Linear`` (``weight [out, in]``) as an effarch projection ``{"kernel": [in, out]}``."""
    params = {"kernel": array(weight).T}
    if bias is not None:
        params["bias"] = array(bias)
    return params


def conv(weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, jax.Array]:
    """A depthwise causal ``torch.nn.Conv1d`` (``weight [D, 1, W]``) as a ``ShortConv`` (``kernel [W, D]``).

    Both put the last tap on the current token.
    """
    params = {"kernel": array(weight[:, 0, :]).T}
    if bias is not None:
        params["bias"] = array(bias)
    return params


def tensor(x: jax.Array) -> torch.Tensor:
    """A JAX array as a float32 torch tensor."""
    return torch.from_numpy(np.array(x, np.float32))


def effarch_outputs(mixer, params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The full-sequence output ``[B,T,D]``, and the output ``[B,1,D]`` of the last token decoded after the rest."""
    apply = jax.jit(mixer.apply)
    full, _ = apply(params, x)
    cache = mixer.init_cache(x.shape[0], x.shape[1])
    _, cache = apply(params, x[:, :-1], cache)
    step, _ = apply(params, x[:, -1:], cache)
    return full, step


def check_parity(mixer, params, x: jax.Array,
                 reference: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], name: str) -> dict[str, float]:
    """Asserts that effarch's mixer and the reference layer are one function (docs/design.md §5 tolerance).

    Args:
      mixer, params: the effarch mixer and its ported parameters.
      x: ``[B,T,D]`` float32 input.
      reference: ``x -> (full [B,T,D], step [B,1,D])`` of the reference layer,
        the same two outputs as :func:`effarch_outputs`.
      name: for the messages.

    Returns:
      the measured relative RMS errors ``{"full": ..., "decode": ...}``.
    """
    full, step = effarch_outputs(mixer, params, x)
    with torch.no_grad():
        ref_full, ref_step = (array(t) for t in reference(tensor(x)))
    errors = {"full": relative_rmse(full, ref_full), "decode": relative_rmse(step, ref_step)}
    print(f"{name}: relative RMS full {errors['full']:.2e}, decode {errors['decode']:.2e}")
    assert_relative_close(full, ref_full, name=f"{name} full sequence")
    assert_relative_close(step, ref_step, name=f"{name} decode step")
    return errors
