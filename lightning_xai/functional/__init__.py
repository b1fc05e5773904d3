"""Pure-torch, differentiable kernels: contextual-decomposition rules and explanation penalties.

Nothing here imports Lightning; every loss term of the callbacks has its functional form here.
"""

from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.contextual_decomposition import Decomposition
from lightning_xai.functional.penalties import (
    cdep_penalty,
    expected_gradients_penalty,
    input_x_gradient_penalty,
    rrr_penalty,
)

__all__ = [
    "Decomposition",
    "broadcast_mask",
    "cdep_penalty",
    "expected_gradients_penalty",
    "input_x_gradient_penalty",
    "rrr_penalty",
]
