"""One glossary of axis letters, used in annotations, einsum strings and comments.

    B  batch                    T  time (query positions)   S  time (key positions)
    H  heads                    K  key / feature dim         V  value dim
    D  model or channel dim     N  state dim (SSM)          G  groups (B/C sharing)
    C  chunk length             M  number of chunks (T / C)  L  number of layers
    E  experts

Every public function states its shapes with these letters, e.g. ``q [B,T,H,K]``,
and einsum strings use the same letters in lower case (``"bthk,bshk->bhts"``).
"""

from typing import Any, Union

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

Shape = tuple[int, ...]
DType = Any
PyTree = Any
ArrayLike = Union[jax.Array, np.ndarray]

# Inputs of the one recurrence (docs/design.md §1).
Queries = Float[Array, "B T H K"]
Keys = Float[Array, "B T H K"]
# linear_attention's q and k may have G heads (groups), each shared by H / G value heads.
GroupedQueries = Float[Array, "B T G K"]
GroupedKeys = Float[Array, "B T G K"]
Values = Float[Array, "B T H V"]
State = Float[Array, "B H K V"]
LogDecay = Union[
    Float[Array, "H"], Float[Array, "B T H"], Float[Array, "B T H K"]
]
SegmentIds = Int[Array, "B T"]

# Selective scan / diagonal scan.
Channels = Float[Array, "B T D"]
SSMState = Float[Array, "B D N"]
ChannelState = Float[Array, "B D"]

# Mixers and models.
Activations = Float[Array, "B T D"]
Tokens = Int[Array, "B T"]
Logits = Float[Array, "B T V"]
Mask = Bool[Array, "B T"]

__all__ = [
    "Activations", "Array", "ArrayLike", "Bool", "Channels", "ChannelState",
    "DType", "Float", "GroupedKeys", "GroupedQueries", "Int", "Keys", "LogDecay", "Logits", "Mask",
    "PRNGKeyArray", "PyTree", "Queries", "SSMState", "SegmentIds", "Shape",
    "State", "Tokens", "Values",
]
