"""Lightning callbacks of lightning_xai, one public callback per module."""

from lightning_xai.callbacks._loss_term import LossTerm, schedule_factor
from lightning_xai.callbacks.attribution_metrics import AttributionMetrics
from lightning_xai.callbacks.explanation_penalty import ExplanationPenalty

__all__ = ["AttributionMetrics", "ExplanationPenalty", "LossTerm", "schedule_factor"]
