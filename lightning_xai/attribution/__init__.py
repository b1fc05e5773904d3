"""Attribution engines: contextual decomposition with its rule registry."""

from lightning_xai.attribution._cd_rules import register_cd_rule
from lightning_xai.attribution.contextual_decomposition import contextual_decomposition
from lightning_xai.functional._masks import broadcast_mask

__all__ = ["broadcast_mask", "contextual_decomposition", "register_cd_rule"]
