"""Two CPU processes under ddp_spawn must give the penalty and the update of one process on the global batch."""

import copy

import pytest
import torch
from torch.nn import functional as F

from lightning_xai.attribution import contextual_decomposition
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.functional import cdep_penalty, rrr_penalty
from tests.helpers import MLP, DictDataset, decoy_tabular, loader, trainer


@pytest.fixture(autouse=True)
def _share_tensors_through_files():
    # Containers often give /dev/shm only a few MB; file-backed sharing lets spawned workers receive tensors.
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


@pytest.mark.parametrize("method", ["rrr", "cdep"])
def test_ddp_spawn_two_processes_equal_single_process_on_global_batch(method):
    torch.manual_seed(0)
    x, y, mask = decoy_tabular(8)
    data = DictDataset(input=x, target=y, mask=mask)
    model = MLP(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    weight = 2.0

    run = trainer(
        max_steps=1,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=True,
        callbacks=[ExplanationPenalty(method=method, weight=weight)],
    )
    run.fit(model, loader(data, 4))  # each rank sees 4 of the 8 samples

    if method == "rrr":
        penalty = rrr_penalty(reference, x, mask)
    else:
        penalty = cdep_penalty(*contextual_decomposition(reference, x, mask))
    # the logged value is the mean over ranks (sync_dist), which equals the penalty on the global batch
    assert run.callback_metrics[f"xai/{method}_step"].item() == pytest.approx(penalty.item(), rel=1e-5)
    loss = F.cross_entropy(reference(x), y) + weight * penalty
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    # ddp_spawn sends the trained weights back to the main process
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conditional", [False, True])
def test_ddp_mutual_information_regularizer_equals_single_process_on_global_batch(conditional):
    from lightning_xai.callbacks import MutualInformationRegularizer
    from lightning_xai.functional import mutual_information_penalty

    g = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    sex, race = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    data = DictDataset(input=x, target=y, sex=sex, race=race)
    torch.manual_seed(0)
    model = MLP(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    weight = 3.0
    regularizer = MutualInformationRegularizer(
        ["sex", "race"], [2, 3], weight=weight, conditional_on_target=conditional
    )
    run = trainer(max_steps=1, devices=2, strategy="ddp_spawn", use_distributed_sampler=True, callbacks=[regularizer])
    run.fit(model, loader(data, n // 2))  # each rank sees half of the batch, and some cells only on one rank

    logits = reference(x)
    penalty = mutual_information_penalty(
        logits.softmax(1), torch.stack([sex, race], 1), [2, 3], y, conditional_on_target=conditional
    )
    # every rank computes the global-batch estimate from the gathered cell sums
    assert run.callback_metrics["xai/mutual_information_step"].item() == pytest.approx(penalty.item(), rel=1e-5)
    loss = F.cross_entropy(logits, y) + weight * penalty
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient, atol=1e-5, rtol=1e-4)


def test_ddp_fairness_metrics_equal_single_process():
    from lightning_xai.callbacks import FairnessMetrics
    from tests.callbacks.test_fairness_metrics import Classifier, tabular

    data = tabular(64)
    values = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        callback = FairnessMetrics(["sex", "race"], [2, 3], attribute_columns={"sex": [2, 3], "race": [4, 5, 6]})
        run = trainer(devices=devices, strategy=strategy, use_distributed_sampler=True, callbacks=[callback])
        run.validate(Classifier(), loader(DictDataset(**data), 16))
        values[devices] = {k: v.item() for k, v in run.callback_metrics.items() if k.startswith("fair/")}
    assert values[1].keys() == values[2].keys() and len(values[1]) > 40
    for key, value in values[1].items():
        assert values[2][key] == pytest.approx(value, abs=1e-6), key


def test_ddp_concept_heads_without_find_unused_parameters_equal_single_process():
    from lightning_xai.callbacks import AdversarialConceptHead, ControlConceptHead
    from tests.callbacks.test_concept_heads import SGDEncoder, planted

    data = planted(16)
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):  # ddp_spawn: find_unused_parameters=False
        torch.manual_seed(0)
        model = SGDEncoder()
        heads = [
            AdversarialConceptHead("encoder", "gender", 2, reversal=0.5, schedule="constant"),
            ControlConceptHead("encoder", "control", 2),
        ]
        run = trainer(max_steps=1, devices=devices, strategy=strategy, use_distributed_sampler=True, callbacks=heads)
        for head in heads:  # the same initial heads in both runs (setup keeps existing heads)
            torch.manual_seed(1)
            head.setup(run, model, "fit")
        run.fit(model, loader(DictDataset(**data), 16 // devices))
        results[devices] = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any(name.startswith("xai_concept_heads.gender_adversary") for name in results[2])
    for name, value in results[1].items():
        torch.testing.assert_close(results[2][name], value, atol=1e-5, rtol=1e-4, msg=name)


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
    values = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        callback = ConceptEffect("encoder", "gender", reference_model=reference, distance="tv")
        run = trainer(devices=devices, strategy=strategy, use_distributed_sampler=True, callbacks=[callback])
        torch.manual_seed(1)
        run.validate(Encoder(), loader(DictDataset(**data), 16))
        values[devices] = {k: v.item() for k, v in run.callback_metrics.items() if k.startswith("concept/")}
    assert {"concept/gender/treate", "concept/gender/ate_gt", "concept/gender/conexp"} <= values[2].keys()
    assert values[1]["concept/gender/treate"] > 0.01
    for key in ("treate", "ate_gt", "conexp", "treate_low", "ate_gt_high"):
        assert values[2][f"concept/gender/{key}"] == pytest.approx(values[1][f"concept/gender/{key}"], rel=1e-5)
    # the probe's split depends on the row order, which the distributed sampler interleaves: close, not equal
    assert values[2]["concept/gender/probe_accuracy"] == pytest.approx(
        values[1]["concept/gender/probe_accuracy"], abs=0.1
    )


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
