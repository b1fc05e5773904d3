"""Lightning callbacks of lightning_xai, one public callback per module."""

from lightning_xai.callbacks._concept_head import strip_concept_heads
from lightning_xai.callbacks._loss_term import LossTerm, schedule_factor
from lightning_xai.callbacks.adversarial_concept_head import AdversarialConceptHead
from lightning_xai.callbacks.attribution_metrics import AttributionMetrics
from lightning_xai.callbacks.clarc_projection import ClArCProjection
from lightning_xai.callbacks.concept_effect import ConceptEffect
from lightning_xai.callbacks.control_concept_head import ControlConceptHead
from lightning_xai.callbacks.explanation_penalty import ExplanationPenalty
from lightning_xai.callbacks.fairness_constraint import FairnessConstraint
from lightning_xai.callbacks.fairness_metrics import FairnessMetrics
from lightning_xai.callbacks.generation_attribution_report import GenerationAttributionReport
from lightning_xai.callbacks.mutual_information_regularizer import MutualInformationRegularizer
from lightning_xai.callbacks.neuron_monitor import NeuronMonitor
from lightning_xai.callbacks.revision_freeze import RevisionFreeze
from lightning_xai.callbacks.rrclarc_penalty import RRClArCPenalty
from lightning_xai.callbacks.spatial_bias_monitor import SpatialBiasMonitor

__all__ = [
    "AdversarialConceptHead",
    "ControlConceptHead",
    "AttributionMetrics",
    "ClArCProjection",
    "ConceptEffect",
    "ExplanationPenalty",
    "FairnessConstraint",
    "FairnessMetrics",
    "GenerationAttributionReport",
    "LossTerm",
    "MutualInformationRegularizer",
    "NeuronMonitor",
    "RevisionFreeze",
    "RRClArCPenalty",
    "SpatialBiasMonitor",
    "schedule_factor",
    "strip_concept_heads",
]
