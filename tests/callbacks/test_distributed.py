"""Two CPU processes under ddp_spawn give the values and updates of one process on the global batch."""

import pytest
import torch
from torch.nn import functional as F

from lightning_xai.attribution import contextual_decomposition
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.functional import cdep_penalty, rrr_penalty
from tests.helpers import MLP, DictDataset, assert_ddp_matches_single, decoy_tabular

pytestmark = pytest.mark.ddp


def _sgd_mlp():
    torch.manual_seed(0)
    return MLP(optimizer="sgd", lr=0.5)


def _assert_one_sgd_step(parameters, loss_of, lr=0.5):
    reference = _sgd_mlp()
    gradients = torch.autograd.grad(loss_of(reference), list(reference.parameters()))
    for (name, parameter), before, gradient in zip(parameters.items(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter, before.detach() - lr * gradient, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["rrr", "cdep"])
def test_ddp_spawn_two_processes_equal_single_process_on_global_batch(method):
    x, y, mask = decoy_tabular(8)
    weight = 2.0
    results = assert_ddp_matches_single(
        _sgd_mlp,
        lambda: [ExplanationPenalty(method=method, weight=weight)],
        DictDataset(input=x, target=y, mask=mask),
        batch_size=8,  # each rank sees 4 of the 8 samples
        max_steps=1,
    )

    def penalty(model):
        if method == "rrr":
            return rrr_penalty(model, x, mask)
        return cdep_penalty(*contextual_decomposition(model, x, mask))

    # the logged value is the mean over ranks (sync_dist), which equals the penalty on the global batch
    assert results[2]["values"][f"xai/{method}_step"] == pytest.approx(penalty(_sgd_mlp()).item(), rel=1e-5)
    _assert_one_sgd_step(results[2]["parameters"], lambda m: F.cross_entropy(m(x), y) + weight * penalty(m))


@pytest.mark.parametrize("conditional", [False, True])
def test_ddp_mutual_information_regularizer_equals_single_process_on_global_batch(conditional):
    from lightning_xai.callbacks import MutualInformationRegularizer
    from lightning_xai.functional import mutual_information_penalty

    g = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    sex, race = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    weight = 3.0
    results = assert_ddp_matches_single(
        _sgd_mlp,
        lambda: [
            MutualInformationRegularizer(["sex", "race"], [2, 3], weight=weight, conditional_on_target=conditional)
        ],
        DictDataset(input=x, target=y, sex=sex, race=race),
        batch_size=n,  # each rank sees half of the batch, and some cells only on one rank
        max_steps=1,
    )

    def penalty(model):
        groups = torch.stack([sex, race], 1)
        return mutual_information_penalty(model(x).softmax(1), groups, [2, 3], y, conditional_on_target=conditional)

    # every rank computes the global-batch estimate from the gathered cell sums
    assert results[2]["values"]["xai/mutual_information_step"] == pytest.approx(penalty(_sgd_mlp()).item(), rel=1e-5)
    _assert_one_sgd_step(results[2]["parameters"], lambda m: F.cross_entropy(m(x), y) + weight * penalty(m))


@pytest.mark.parametrize("kind", ["max_dp_difference", "max_eo_difference"])
def test_ddp_fairness_constraint_holds_one_multiplier_equal_to_the_single_process(kind):
    from lightning_xai.callbacks import FairnessConstraint

    g = torch.Generator().manual_seed(1)
    n = 32
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    sex, race = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    results = assert_ddp_matches_single(
        _sgd_mlp,
        lambda: [
            FairnessConstraint(
                ["sex", "race"], [2, 3], **{kind: 0.0}, initial_multiplier=1.0, multiplier_lr=0.5, name="bound"
            )
        ],
        DictDataset(input=x, target=y, sex=sex, race=race),
        batch_size=8,  # four global batches of 8: the multiplier after each step depends on both ranks' decisions
        max_steps=4,
    )
    # the multiplier is logged per step on every rank without reduction: equal only if every rank holds it
    for key in ("xai/bound/multiplier_step", "xai/bound/gap_step", "xai/bound_step"):
        assert results[2]["values"][key] == pytest.approx(results[1]["values"][key], rel=1e-5)
    assert results[1]["values"]["xai/bound/multiplier_step"] != 1.0


def test_ddp_fairness_metrics_equal_single_process():
    from lightning_xai.callbacks import FairnessMetrics
    from tests.callbacks.test_fairness_metrics import Classifier, tabular

    results = assert_ddp_matches_single(
        Classifier,
        lambda: [FairnessMetrics(["sex", "race"], [2, 3], attribute_columns={"sex": [2, 3], "race": [4, 5, 6]})],
        DictDataset(**tabular(64)),
        batch_size=16,
        stage="validate",
        prefixes=("fair/",),
        atol=1e-6,
        rtol=0.0,
        parameters=False,
    )
    assert len(results[1]["values"]) > 40


def test_ddp_concept_heads_without_find_unused_parameters_equal_single_process():
    from lightning_xai.callbacks import AdversarialConceptHead, ControlConceptHead
    from tests.callbacks.test_concept_heads import SGDEncoder, planted

    built = {}

    def make_model():
        torch.manual_seed(0)
        built["model"] = SGDEncoder()
        return built["model"]

    def make_heads():
        heads = [
            AdversarialConceptHead("encoder", "gender", 2, reversal=0.5, schedule="constant"),
            ControlConceptHead("encoder", "control", 2),
        ]
        for head in heads:  # the same initial heads in both runs (setup keeps existing heads)
            torch.manual_seed(1)
            head.setup(None, built["model"], "fit")
        return heads

    results = assert_ddp_matches_single(
        make_model,
        make_heads,
        DictDataset(**planted(16)),
        batch_size=16,
        max_steps=1,  # ddp_spawn: no unused params
    )
    assert any(name.startswith("xai_concept_heads.gender_adversary") for name in results[2]["parameters"])


def test_ddp_concept_effect_gathers_rows_from_all_ranks():
    from lightning_xai.callbacks import ConceptEffect
    from tests.callbacks.test_concept_heads import Encoder, planted

    data = planted(96)
    data["counterfactual_input"] = data["input"].flip(0)
    reference = Encoder()
    with torch.no_grad():  # a reference that predicts differently from the validated model
        reference.classifier.weight.add_(
            torch.randn(reference.classifier.weight.shape, generator=torch.Generator().manual_seed(2))
        )

    def make_model():
        torch.manual_seed(1)
        return Encoder()

    results = assert_ddp_matches_single(
        make_model,
        lambda: [ConceptEffect("encoder", "gender", reference_model=reference, distance="tv")],
        DictDataset(**data),
        batch_size=32,
        stage="validate",
        prefixes=("concept/",),
        # the probe's split depends on the row order, which the distributed sampler interleaves: close, not equal
        ignore=("probe_accuracy", "probe_majority"),
        rtol=1e-5,
        atol=0.0,
        parameters=False,
    )
    single, distributed = results[1]["values"], results[2]["values"]
    assert {"concept/gender/treate", "concept/gender/ate_gt", "concept/gender/conexp"} <= distributed.keys()
    assert single["concept/gender/treate"] > 0.01
    assert distributed["concept/gender/probe_accuracy"] == pytest.approx(
        single["concept/gender/probe_accuracy"], abs=0.1
    )


@pytest.mark.parametrize(
    "terms",
    [("cdep", "adversary"), ("rrr", "mutual_information")],
    ids=["cdep+adversary", "rrr+mutual_information"],
)
def test_ddp_pairs_of_loss_terms_on_one_cnn_equal_single_process(terms, lightning_package):
    from tests.callbacks.test_composition import CNN_TERMS, CompositionCNNBody, cnn_batch, seed_heads
    from tests.helpers import bind

    built = {}

    def make_model():
        built["model"] = bind(CompositionCNNBody, lightning_package)()
        return built["model"]

    def make_callbacks():  # heads made in the main process: ddp_spawn returns only parameters the model had
        return seed_heads(built["model"], [CNN_TERMS[term]() for term in terms])

    results = assert_ddp_matches_single(
        make_model,
        make_callbacks,
        cnn_batch(16),
        batch_size=16,
        max_steps=1,
        package=lightning_package,
    )
    assert len([k for k in results[2]["values"] if k.endswith("_step") and k != "xai/total_step"]) == 2


def test_callbacks_destroy_a_gloo_group_at_exit_before_python_finalizes(tmp_path):
    # Without it, a gloo worker thread can free a finished collective while Python finalizes and abort the
    # process (SIGABRT after a successful ddp_spawn fit). Handlers run last-in first-out, so the probe
    # registered before setup runs after the callback's clean-up and sees the group gone.
    import subprocess
    import sys

    store = tmp_path / "store"
    script = f"""
import atexit
import torch, torch.distributed as dist
from lightning_xai.callbacks import FairnessMetrics
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
model = torch.nn.Linear(2, 2)
FairnessMetrics(["sex"], [2]).setup(None, model, "validate")
dist.all_reduce(torch.ones(3))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "initialized at exit: False" in result.stdout
