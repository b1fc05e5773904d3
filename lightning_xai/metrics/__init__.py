"""Attribution-quality and fairness metrics as torchmetrics ``Metric`` classes, one per module, over functional kernels.

Every attribution metric shares one ``update(inputs, attributions, target=None, *, model=None, explain_fn=None,
mask=None)`` signature (see :mod:`lightning_xai.metrics._base`); states are sums (or, for the rank correlations of
the consistency metrics, ``cat`` lists), exact under DDP.
"""

from lightning_xai.metrics._base import AttributionMetric
from lightning_xai.metrics.attribution_agreement import AttributionAgreement
from lightning_xai.metrics.comprehensiveness import Comprehensiveness
from lightning_xai.metrics.confidence_indication import ConfidenceIndication
from lightning_xai.metrics.counterfactual_flip import CounterfactualFlip
from lightning_xai.metrics.dataset_consistency import DatasetConsistency
from lightning_xai.metrics.deletion_auc import DeletionAUC
from lightning_xai.metrics.generation_faithfulness import GenerationFaithfulness
from lightning_xai.metrics.infidelity import Infidelity
from lightning_xai.metrics.insertion_auc import InsertionAUC
from lightning_xai.metrics.intersectional_fairness import IntersectionalFairness
from lightning_xai.metrics.mean_activation_map import MeanActivationMap
from lightning_xai.metrics.neuron_activation_stats import NeuronActivationStats
from lightning_xai.metrics.randomization_sanity import RandomizationSanity
from lightning_xai.metrics.rationale_agreement import RationaleAgreement
from lightning_xai.metrics.rationale_consistency import RationaleConsistency
from lightning_xai.metrics.region_attribution_mass import RegionAttributionMass
from lightning_xai.metrics.sensitivity_max import SensitivityMax
from lightning_xai.metrics.sufficiency import Sufficiency

__all__ = [
    "AttributionAgreement",
    "AttributionMetric",
    "Comprehensiveness",
    "ConfidenceIndication",
    "CounterfactualFlip",
    "DatasetConsistency",
    "DeletionAUC",
    "GenerationFaithfulness",
    "Infidelity",
    "InsertionAUC",
    "IntersectionalFairness",
    "NeuronActivationStats",
    "MeanActivationMap",
    "RandomizationSanity",
    "RationaleAgreement",
    "RationaleConsistency",
    "RegionAttributionMass",
    "SensitivityMax",
    "Sufficiency",
]
