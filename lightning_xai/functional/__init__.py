"""Pure-torch kernels: contextual-decomposition rules, explanation penalties and attribution-metric kernels.

Nothing here imports Lightning; every loss term and every metric of the callbacks has its functional form
here.
"""

from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.concept_vectors import (
    clarc_projection,
    concept_strength,
    fit_cav,
    pooled_features,
    rrclarc_penalty,
)
from lightning_xai.functional.concepts import (
    EffectEstimate,
    ate_ground_truth,
    conexp,
    gradient_reversal,
    linear_probe_accuracy,
    pool,
    prediction_distance,
    treate,
)
from lightning_xai.functional.contextual_decomposition import Decomposition
from lightning_xai.functional.fairness import (
    as_probabilities,
    cell_confusion_counts,
    cell_statistics,
    dependence_from_statistics,
    difference_interval,
    fairness_report,
    intersectional_cells,
    mutual_information_penalty,
    parity_gap_floor,
    rate_gap,
    running_statistics,
    wilson_interval,
)
from lightning_xai.functional.faithfulness import (
    class_probability,
    comprehensiveness,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    sufficiency,
)
from lightning_xai.functional.penalties import (
    ablation_penalty,
    cdep_penalty,
    counterexample_inputs,
    counterexample_loss,
    expected_gradients_penalty,
    gradcam_map,
    hint_penalty,
    input_x_gradient_penalty,
    math_attention,
    rbr_penalty,
    rrr_gradcam_penalty,
    rrr_penalty,
)
from lightning_xai.functional.plausibility import (
    confidence_indication,
    rationale_average_precision,
    region_attribution_mass,
)
from lightning_xai.functional.robustness import gaussian_perturbation, infidelity, sensitivity_max
from lightning_xai.functional.sanity import randomize_top_layers, rank_correlation
from lightning_xai.functional.spatial_bias import UnevenPadding, even_input_sizes, uneven_padding

__all__ = [
    "clarc_projection",
    "concept_strength",
    "fit_cav",
    "pooled_features",
    "rrclarc_penalty",
    "Decomposition",
    "ablation_penalty",
    "counterexample_inputs",
    "counterexample_loss",
    "gradcam_map",
    "hint_penalty",
    "rbr_penalty",
    "rrr_gradcam_penalty",
    "EffectEstimate",
    "ate_ground_truth",
    "conexp",
    "gradient_reversal",
    "linear_probe_accuracy",
    "pool",
    "prediction_distance",
    "treate",
    "as_probabilities",
    "cell_confusion_counts",
    "cell_statistics",
    "dependence_from_statistics",
    "difference_interval",
    "fairness_report",
    "intersectional_cells",
    "mutual_information_penalty",
    "parity_gap_floor",
    "rate_gap",
    "running_statistics",
    "wilson_interval",
    "broadcast_mask",
    "cdep_penalty",
    "class_probability",
    "comprehensiveness",
    "confidence_indication",
    "deletion_auc",
    "deletion_curve",
    "expected_gradients_penalty",
    "gaussian_perturbation",
    "infidelity",
    "input_x_gradient_penalty",
    "insertion_auc",
    "insertion_curve",
    "math_attention",
    "randomize_top_layers",
    "rank_correlation",
    "rationale_average_precision",
    "region_attribution_mass",
    "rrr_penalty",
    "sensitivity_max",
    "sufficiency",
    "UnevenPadding",
    "even_input_sizes",
    "uneven_padding",
]
