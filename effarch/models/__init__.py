"""Language models: the hybrid LM backbone, its config and generation.

    from effarch.models import LM, LMConfig, generate
    lm = LM(config=LMConfig.preset("tiny"))
"""

from effarch.models.config import DEFAULT_MIXERS, LayerSpec, LMConfig  # noqa: F401
from effarch.models.generate import generate, speculative_generate  # noqa: F401
from effarch.models.lm import LM, stack_layer_params, unstack_layer_params  # noqa: F401
