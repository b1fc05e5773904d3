"""Attribution engines: contextual decomposition with its rule registry, split Integrated Gradients and
Captum's methods by name."""

from lightning_xai.attribution._cd_rules import register_cd_rule
from lightning_xai.attribution.contextual_decomposition import contextual_decomposition, decompose, set_cd_kernel
from lightning_xai.attribution.methods import attribute, available_attribution_methods, register_attribution_method
from lightning_xai.attribution.smooth_surrogate import LogSumExpPool1d, LogSumExpPool2d, smooth_surrogate, smoothed
from lightning_xai.attribution.split_integrated_gradients import split_integrated_gradients
from lightning_xai.functional._masks import broadcast_mask

__all__ = [
    "LogSumExpPool1d",
    "LogSumExpPool2d",
    "attribute",
    "available_attribution_methods",
    "broadcast_mask",
    "contextual_decomposition",
    "decompose",
    "register_attribution_method",
    "register_cd_rule",
    "set_cd_kernel",
    "smooth_surrogate",
    "smoothed",
    "split_integrated_gradients",
]
