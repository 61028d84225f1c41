"""The math of every mixer, in pure JAX, in every form (docs/design.md §3).

Each op takes ``implementation=`` ("auto", "recurrent", "quadratic", "chunked",
"pallas", and for attention "xla", "cudnn"); every choice gives the same
numbers within tolerance.
"""

from effarch.ops.linear_attention import linear_attention  # noqa: F401
from effarch.ops.selective_scan import selective_scan  # noqa: F401
from effarch.ops.linear_scan import linear_scan  # noqa: F401
from effarch.ops.attention import attention, decode_attention  # noqa: F401
from effarch.ops.delta_rule import delta_rule, generalized_delta_rule  # noqa: F401
