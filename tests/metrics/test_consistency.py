"""Rationale and dataset consistency (Atanasova et al., EMNLP 2020): kernels, metrics, DDP and the callback path."""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import spearmanr
from torch import nn

from lightning_xai.callbacks import AttributionMetrics
from lightning_xai.datasets import DecoyDigits
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import (
    activation_distance,
    consistency_correlation,
    instance_pairs,
    layer_activations,
    mean_activations,
    min_max_scale,
    model_activation_distance,
    pair_activation_distance,
    saliency_distance,
    token_overlap,
    vocabulary_saliency_distance,
)
from lightning_xai.functional.sanity import parameterised_layers, randomize_top_layers
from lightning_xai.metrics import DatasetConsistency, RationaleConsistency
from tests.helpers import DictDataset, LSTMTextClassifier, SmallCNN, loader, trainer


def input_x_gradient(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    score = model(inputs).gather(1, target[:, None]).sum()
    return inputs * torch.autograd.grad(score, inputs)[0]


class DeadBranch(nn.Module):
    """One live logit ``w . x`` plus a branch whose output is multiplied by 0: gradients never see it."""

    def __init__(self, live: list[float], dead: list[list[float]]) -> None:
        super().__init__()
        self.live = nn.Linear(2, 1, bias=False)
        self.dead = nn.Linear(2, len(dead), bias=False)
        with torch.no_grad():
            self.live.weight.copy_(torch.tensor([live]))
            self.dead.weight.copy_(torch.tensor(dead))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.live(x) + 0.0 * self.dead(x).sum(1, keepdim=True)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


# ---------------------------------------------------------------- kernels


def test_activation_distance_is_the_mean_over_layers_of_the_absolute_mean_difference():
    generator = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(5, 3, 4, generator=generator), "y": torch.randn(5, 7, generator=generator)}
    b = {"x": torch.randn(5, 3, 4, generator=generator), "y": torch.randn(5, 7, generator=generator)}
    expected = ((a["x"] - b["x"]).flatten(1).mean(1).abs() + (a["y"] - b["y"]).mean(1).abs()) / 2
    torch.testing.assert_close(activation_distance(a, b), expected.double())
    torch.testing.assert_close(activation_distance(mean_activations(a), mean_activations(b)), expected.double())
    with pytest.raises(XAIConfigurationError, match="same layers"):
        activation_distance(a, {"x": b["x"]})
    with pytest.raises(XAIConfigurationError, match="layer 'x' has shape"):
        activation_distance(a, {"x": b["x"][:, :2], "y": b["y"]})


def test_layer_activations_hooks_leaf_layers_or_named_ones_and_skips_layers_that_do_not_run():
    wrapper = nn.Module()
    wrapper.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapper.spare = nn.Linear(3, 3)  # has parameters, never runs
    wrapper.forward = lambda x: wrapper.net(x)
    _, activations = layer_activations(wrapper, torch.zeros(2, 3))
    assert list(activations) == ["net.0", "net.2"]
    _, named = layer_activations(wrapper, torch.zeros(2, 3), ["2"])  # a suffix of net.2
    assert list(named) == ["2"] and named["2"].shape == (2, 2)
    with pytest.raises(XAIConfigurationError, match="no layer 'head'.*net.0"):
        layer_activations(wrapper, torch.zeros(2, 3), ["head"])


def test_dead_branch_gives_activation_distance_but_zero_saliency_distance_and_an_undefined_correlation():
    x = torch.stack([torch.arange(1.0, 9.0), torch.linspace(-2, 3, 8)], dim=1)
    model_a = DeadBranch([1.0, -1.0], [[1.0, 0.0], [0.0, 1.0]])
    model_b = DeadBranch([1.0, -1.0], [[3.0, 0.0], [0.0, -2.0]])
    target = torch.zeros(8, dtype=torch.long)
    activations = model_activation_distance(model_a, model_b, x)
    saliencies = saliency_distance(input_x_gradient(model_a, x, target), input_x_gradient(model_b, x, target))
    assert activations.min() > 0 and activations.unique().numel() == 8
    assert torch.equal(saliencies, torch.zeros(8, dtype=torch.float64))
    assert torch.isnan(consistency_correlation(activations, saliencies))  # nothing to rank: the saliency is blind

    metric = RationaleConsistency(reference=model_b, classes="target")
    metric.update(x, input_x_gradient(model_a, x, target), target, model=model_a, explain_fn=input_x_gradient)
    assert torch.isnan(metric.compute())
    torch.testing.assert_close(metric.compute_distances()[0], activations)


@pytest.mark.parametrize(
    ("dead_b", "second_feature", "expected"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], lambda k: torch.ones_like(k), 1.0),  # live layer differs only: monotone
        ([[1.0, 1.0], [0.0, 2.0]], lambda k: 20 - 2 * k, -1.0),  # the dead branch differs most where saliency least
    ],
)
@pytest.mark.parametrize("classes", ["all", "target"])
def test_constructed_model_pairs_give_a_known_sign(dead_b, second_feature, expected, classes):
    k = torch.arange(1.0, 9.0)
    x = torch.stack([k, second_feature(k)], dim=1)
    model_a = DeadBranch([1.0, 0.5], [[1.0, 0.0], [0.0, 1.0]])
    model_b = DeadBranch([2.0, 0.5], dead_b)  # live weights differ in feature 0: saliency distance = k / 2
    target = torch.zeros(8, dtype=torch.long)
    metric = RationaleConsistency(reference=model_b, classes=classes)
    metric.update(
        x[:5], input_x_gradient(model_a, x[:5], target[:5]), target[:5], model=model_a, explain_fn=input_x_gradient
    )
    metric.update(
        x[5:], input_x_gradient(model_a, x[5:], target[5:]), target[5:], model=model_a, explain_fn=input_x_gradient
    )
    activations, saliencies = metric.compute_distances()
    torch.testing.assert_close(saliencies, k.double() / 2)
    assert metric.compute().item() == pytest.approx(expected)


def test_a_model_against_its_own_copy_has_zero_distances():
    model = _mlp()
    x = torch.randn(10, 6)
    target = model(x).argmax(1)
    metric = RationaleConsistency(reference=copy.deepcopy(model))
    metric.update(x, input_x_gradient(model, x, target), target, model=model, explain_fn=input_x_gradient)
    activations, saliencies = metric.compute_distances()
    assert torch.equal(activations, torch.zeros(10, dtype=torch.float64))
    assert torch.equal(saliencies, torch.zeros(10, dtype=torch.float64))
    assert torch.isnan(metric.compute())


def test_min_max_scale_and_spearman_match_scikit_learn_and_scipy():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(200, generator=generator).double()
    s = (a + 0.7 * torch.randn(200, generator=generator).double()).round(decimals=1)  # ties too
    scaled = min_max_scale(a)
    assert scaled.min() == 0 and scaled.max() == 1
    np.testing.assert_allclose(scaled.numpy(), (a.numpy() - a.numpy().min()) / np.ptp(a.numpy()))
    expected = spearmanr(a.numpy(), s.numpy()).statistic
    assert 0.5 < expected < 0.95
    assert consistency_correlation(a, s).item() == pytest.approx(expected, abs=1e-12)
    independent = consistency_correlation(torch.randn(4000, generator=generator), torch.rand(4000, generator=generator))
    assert abs(independent.item()) < 0.05
    assert torch.isnan(consistency_correlation(torch.ones(1), torch.ones(1)))


def _paper_vocabulary_distance(ids_a, sal_a, ids_b, sal_b, absent=1e-7):
    """Atanasova et al.'s loop (consist_data.py): a vocabulary-sized vector per instance, absent tokens 1e-7."""
    size = max(max(ids_a), max(ids_b)) + 1
    mask, mult_a, mult_b = [0.0] * size, [absent] * size, [absent] * size
    for token, value in zip(ids_a, sal_a):
        mult_a[token], mask[token] = value, 1.0
    for token, value in zip(ids_b, sal_b):
        mult_b[token], mask[token] = value, 1.0
    kept = [i for i in range(size) if mask[i]]
    return float(np.mean(np.abs(np.array(mult_a)[kept] - np.array(mult_b)[kept])))


def test_vocabulary_saliency_distance_matches_the_authors_loop():
    generator = torch.Generator().manual_seed(0)
    # distinct tokens per row (where the authors' "last occurrence" and our mean agree), padding -1 at the end
    ids = torch.stack([torch.randperm(30, generator=generator)[:8] for _ in range(12)])
    ids[3, 6:] = -1
    saliency = torch.randn(12, 8, generator=generator).double()
    pairs = torch.tensor([[0, 1], [2, 3], [3, 4], [5, 5], [6, 11]])
    got = vocabulary_saliency_distance(ids, saliency, pairs, chunk_size=2)
    for (i, j), value in zip(pairs.tolist(), got.tolist()):
        keep_i, keep_j = ids[i] >= 0, ids[j] >= 0
        expected = _paper_vocabulary_distance(
            ids[i][keep_i].tolist(), saliency[i][keep_i].tolist(), ids[j][keep_j].tolist(), saliency[j][keep_j].tolist()
        )
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[3] == 0  # an instance with itself


def test_vocabulary_saliency_distance_averages_repeated_tokens_ignores_ids_and_averages_classes():
    ids = torch.tensor([[5, 5, 0, 7], [5, 9, 0, 0]])
    saliency = torch.tensor([[[1.0, 3.0, 8.0, 1.0]], [[2.0, 1.0, 8.0, 8.0]]]).repeat(1, 2, 1)  # two classes alike
    saliency[:, 1] *= 2  # the second class doubles: its distance doubles
    # union {5, 7, 9} (0 ignored); class 0: |2 - 2| + |1 - 0| + |0 - 1| over 3, class 1 twice that
    got = vocabulary_saliency_distance(ids, saliency, torch.tensor([[0, 1]]), ignore_ids=[0], absent=0.0)
    assert got.item() == pytest.approx((2 / 3 + 4 / 3) / 2)
    with pytest.raises(XAIConfigurationError, match=r"\(N, T\) token ids"):
        vocabulary_saliency_distance(ids, torch.zeros(2, 4, 3, 2), torch.tensor([[0, 1]]))


def test_token_overlap_and_instance_pairs_match_a_brute_force_selection():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (15, 6), generator=generator)
    labels = torch.randint(0, 3, (15,), generator=generator)
    overlap = token_overlap(ids, ignore_ids=[0])
    sets = [set(row.tolist()) - {0} for row in ids]
    assert overlap.tolist() == [[len(a & b) for b in sets] for a in sets]
    pairs = instance_pairs(labels, overlap, 20, min_same_similarity=1)
    candidates = [(i, j) for i in range(15) for j in range(i + 1, 15)]
    same = sorted(
        [(i, j) for i, j in candidates if labels[i] == labels[j] and overlap[i, j] >= 1],
        key=lambda p: -overlap[p].item(),
    )[:10]
    different = sorted([(i, j) for i, j in candidates if labels[i] != labels[j]], key=lambda p: overlap[p].item())[:10]
    assert [tuple(p) for p in pairs.tolist()] == same + different
    with pytest.raises(XAIConfigurationError, match=r"\(N, N\) similarity"):
        instance_pairs(labels, overlap[:3], 4)


def test_duplicated_instances_have_zero_activation_and_saliency_distance():
    model = _mlp()
    x = torch.randn(6, 6)
    x[4] = x[1]
    _, activations = layer_activations(model, x)
    pairs = torch.tensor([[1, 4], [0, 1]])
    distances = pair_activation_distance(activations, pairs)
    # zero up to the last bits of a batched matrix product (rows of one batch may round differently)
    assert distances[0] < 1e-7 and distances[1] > 1e-2
    saliency = input_x_gradient(model, x, torch.zeros(6, dtype=torch.long))
    assert saliency_distance(saliency[pairs[:, 0]], saliency[pairs[:, 1]])[0] < 1e-7

    ids = torch.randint(1, 20, (6, 5))
    ids[4] = ids[1]
    token_saliency = saliency[:, :5]
    assert vocabulary_saliency_distance(ids, token_saliency, pairs)[0] < 1e-7


# ---------------------------------------------------------------- RationaleConsistency


def test_default_pair_is_the_randomly_initialised_copy_and_the_value_is_scipys_spearman():
    model = _mlp()
    x = torch.randn(40, 6)
    y = model(x).argmax(1)
    metric = RationaleConsistency(seed=3)
    for rows in (slice(0, 25), slice(25, 40)):
        metric.update(
            x[rows], input_x_gradient(model, x[rows], y[rows]), y[rows], model=model, explain_fn=input_x_gradient
        )
    other = randomize_top_layers(model, len(parameterised_layers(model)), seed=3)
    classes = [torch.full((40,), c) for c in range(3)]
    expected_saliency = saliency_distance(
        torch.stack([input_x_gradient(model, x, c) for c in classes], 1),
        torch.stack([input_x_gradient(other, x, c) for c in classes], 1),
    )
    activations, saliencies = metric.compute_distances()
    torch.testing.assert_close(activations, model_activation_distance(model, other, x))
    torch.testing.assert_close(saliencies, expected_saliency)
    expected = spearmanr(activations.numpy(), saliencies.numpy()).statistic
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)
    assert metric.higher_is_better


def test_rationale_consistency_sums_token_saliencies_over_the_embedding_and_matches_layers_through_a_prefix():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3, 2))
    wrapped = nn.Module()
    wrapped.model = copy.deepcopy(head)
    wrapped.forward = lambda x: wrapped.model(x)
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3, 2))  # its layer "1" is the wrapper's "model.1"
    x = torch.randn(5, 4, 3)
    y = torch.zeros(5, dtype=torch.long)
    metric = RationaleConsistency(reference=reference, classes="target", feature_dims=(1,))
    metric.update(x, input_x_gradient(wrapped, x, y), y, model=wrapped, explain_fn=input_x_gradient)
    expected = saliency_distance(input_x_gradient(wrapped, x, y).sum(-1), input_x_gradient(reference, x, y).sum(-1))
    torch.testing.assert_close(metric.compute_distances()[1], expected)
    torch.testing.assert_close(metric.compute_distances()[0], model_activation_distance(head, reference, x))


def test_rationale_consistency_errors_name_the_fix():
    model = _mlp()
    x = torch.randn(4, 6)
    with pytest.raises(XAIConfigurationError, match="explain_fn"):
        RationaleConsistency().update(x, x, model=model)
    with pytest.raises(XAIConfigurationError, match="classes='each'"):
        RationaleConsistency(classes="each")
    with pytest.raises(XAIConfigurationError, match="share no layer"):
        RationaleConsistency(reference=nn.Sequential(nn.Linear(6, 3))).update(
            x, x, model=model, explain_fn=input_x_gradient
        )
    with pytest.raises(XAIConfigurationError, match="feature_dims"):
        RationaleConsistency(feature_dims=(0,))

    class Scale(nn.Module):  # parameters, but no reset_parameters
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.weight

    scaled = nn.Sequential(Scale(), nn.Linear(6, 2))
    with pytest.raises(XAIConfigurationError, match=r"no reset_parameters.*reference=\.\.\."):
        RationaleConsistency().update(x, x, model=scaled, explain_fn=input_x_gradient)


# ---------------------------------------------------------------- DatasetConsistency


def test_features_scaled_along_one_direction_give_dataset_consistency_one():
    # x_i = s_i * u through one linear layer: both pair distances are proportional to |s_i - s_j|
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(30, generator=generator) * 4 - 2
    x = scale[:, None] * torch.tensor([1.0, 2.0, 0.5])
    labels = (scale > 0).long()
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.5, 2.0], [0.2, 1.0, 1.0]]))
    metric = DatasetConsistency(num_pairs=60)
    metric.update(x, input_x_gradient(model, x, labels), labels, model=model, explain_fn=input_x_gradient)
    pairs, instances = metric.compute_pairs()
    assert pairs.shape == (60, 2)
    paired = instances["labels"][pairs]
    assert (paired[:30, 0] == paired[:30, 1]).all() and (paired[30:, 0] != paired[30:, 1]).all()
    assert metric.compute().item() == pytest.approx(1.0)


def _text_batch(n=24, length=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(14, generator=generator)[:length] + 1 for _ in range(n)])  # distinct tokens
    ids[n // 2 :] = ids[: n // 2]  # every instance twice: duplicates are the most overlapping pairs
    labels = torch.randint(0, 2, (n // 2,), generator=generator).repeat(2)
    return ids, labels


class BagOfEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(15, 4)
        self.hidden = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(embeddings.mean(1))))


def test_text_pairs_use_word_overlap_and_duplicates_come_first_with_zero_distances():
    model = BagOfEmbeddings()
    ids, labels = _text_batch()
    inputs = model.embedding(ids).detach()
    metric = DatasetConsistency(num_pairs=40)
    metric.update(
        inputs, input_x_gradient(model, inputs, labels), labels, model=model, explain_fn=input_x_gradient, token_ids=ids
    )
    pairs, instances = metric.compute_pairs()
    activations, saliencies = metric.compute_distances()
    duplicates = (instances["token_ids"][pairs[:, 0]] == instances["token_ids"][pairs[:, 1]]).all(1)
    assert duplicates[:12].all()  # the 12 duplicated instances have full overlap: the top same-label pairs
    assert activations[:12].max() < 1e-7 and saliencies[:12].max() < 1e-7  # zero up to rounding
    assert activations[12:].min() > 1e-6
    # the distances are the kernels' on the canonically ordered instances
    per_token = torch.stack(
        [input_x_gradient(model, inputs, torch.full((24,), c)).sum(-1) for c in range(2)], 1
    ).double()
    order = [next(k for k in range(24) if torch.equal(ids[k], row)) for row in instances["token_ids"]]
    expected = vocabulary_saliency_distance(instances["token_ids"], per_token[order], pairs)
    torch.testing.assert_close(saliencies, expected)
    value = spearmanr(activations.numpy(), saliencies.numpy()).statistic
    assert metric.compute().item() == pytest.approx(value, abs=1e-12)


def test_dataset_consistency_does_not_depend_on_batch_order_or_split():
    model = BagOfEmbeddings()
    ids, labels = _text_batch(seed=1)
    inputs = model.embedding(ids).detach()

    def value(order, splits):
        metric = DatasetConsistency(num_pairs=50, ignore_ids=[3])
        for rows in torch.tensor_split(order, splits):
            metric.update(
                inputs[rows], inputs[rows], labels[rows], model=model, explain_fn=input_x_gradient, token_ids=ids[rows]
            )
        return metric.compute()

    reference = value(torch.arange(24), 1)
    assert torch.isfinite(reference)
    torch.testing.assert_close(value(torch.randperm(24, generator=torch.Generator().manual_seed(0)), 3), reference)


def test_dataset_consistency_errors_name_the_fix():
    model = BagOfEmbeddings()
    ids, labels = _text_batch()
    inputs = model.embedding(ids).detach()
    metric = DatasetConsistency()
    with pytest.raises(XAIConfigurationError, match="target"):
        metric.update(inputs, inputs, model=model, explain_fn=input_x_gradient, token_ids=ids)
    with pytest.raises(XAIConfigurationError, match=r"\(N, T\) ids"):
        metric.update(inputs, inputs, labels, model=model, explain_fn=input_x_gradient, token_ids=ids[:, :3])
    metric.update(inputs, inputs, labels, model=model, explain_fn=input_x_gradient, token_ids=ids)
    with pytest.raises(XAIConfigurationError, match="with and without token_ids"):
        metric.update(inputs, inputs, labels, model=model, explain_fn=input_x_gradient)
    with pytest.raises(XAIConfigurationError, match="at least 2 pairs"):
        DatasetConsistency(num_pairs=1)
    assert DatasetConsistency(classes="target").requires == ("model", "target")


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, store: str, results: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        values = _ddp_values(rank, world_size)
        torch.save(values, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_values(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``r`` updates rows ``r, r + world_size, ...`` of every batch, in two batches."""
    model = _mlp()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(5))
    y = model(x).argmax(1)
    text = BagOfEmbeddings()
    ids, labels = _text_batch(32, seed=2)
    embeddings = text.embedding(ids).detach()
    rationale, dataset, features = RationaleConsistency(seed=1), DatasetConsistency(num_pairs=60), DatasetConsistency()
    for batch in (torch.arange(0, 16), torch.arange(16, 32)):
        rows = batch[rank::world_size]
        rationale.update(x[rows], x[rows], y[rows], model=model, explain_fn=input_x_gradient)
        features.update(x[rows], x[rows], y[rows], model=model, explain_fn=input_x_gradient)
        dataset.update(
            embeddings[rows],
            embeddings[rows],
            labels[rows],
            model=text,
            explain_fn=input_x_gradient,
            token_ids=ids[rows],
        )
    return {"rationale": rationale.compute(), "dataset": dataset.compute(), "features": features.compute()}


@pytest.mark.ddp
def test_ddp_with_two_processes_equals_one_process():
    single = _ddp_values(0, 1)
    assert all(torch.isfinite(v) for v in single.values())
    with tempfile.TemporaryDirectory() as results:
        mp.spawn(_ddp_worker, args=(2, os.path.join(results, "store"), results), nprocs=2, join=True)
        for rank in range(2):
            distributed = torch.load(os.path.join(results, f"rank{rank}.pt"))
            for key, value in single.items():
                assert distributed[key].item() == pytest.approx(value.item(), abs=1e-10), (rank, key)


# ---------------------------------------------------------------- the AttributionMetrics callback


class ValidatingCNN(SmallCNN):
    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["input"]).argmax(1) == batch["target"]).float().mean())


def _digits(n, split="train"):
    digits = DecoyDigits(split)
    return DictDataset(input=digits.images[:n], target=digits.targets[:n])


def test_callback_logs_both_consistencies_for_a_cnn_and_they_equal_the_metrics_on_the_probe():
    from lightning_xai.attribution import attribute
    from lightning_xai.callbacks.attribution_metrics import _Logits

    torch.manual_seed(0)
    callback = AttributionMetrics(
        method="input_x_gradient",
        metrics=["rationale_consistency", "dataset_consistency"],
        num_samples=24,
        batch_size=12,
        pictures_every_n_epochs=0,
        metric_kwargs={"dataset_consistency": {"num_pairs": 60}},
    )
    model = ValidatingCNN()
    run = trainer(max_epochs=1, callbacks=[callback])
    run.fit(model, loader(_digits(64), 32), loader(_digits(48, "val"), 16))
    logged = run.callback_metrics
    rationale, dataset = (
        logged["attr/input_x_gradient/rationale_consistency"],
        logged["attr/input_x_gradient/dataset_consistency"],
    )
    assert -1 <= rationale.item() <= 1 and -1 <= dataset.item() <= 1

    model.eval()
    probe = callback._probes["validate"]
    wrapped = _Logits(model)

    def explain(m, x, t):
        return attribute("input_x_gradient", m, x, t)

    expected_rationale, expected_dataset = RationaleConsistency(), DatasetConsistency(num_pairs=60)
    for rows in (slice(0, 12), slice(12, 24)):
        x, t = probe["input"][rows], probe["target"][rows].long()
        a = explain(wrapped, x, t)
        expected_rationale.update(x, a, t, model=wrapped, explain_fn=explain)
        expected_dataset.update(x, a, t, model=wrapped, explain_fn=explain)
    assert rationale.item() == pytest.approx(expected_rationale.compute().item(), abs=1e-5)
    assert dataset.item() == pytest.approx(expected_dataset.compute().item(), abs=1e-5)


def test_callback_gives_dataset_consistency_the_token_ids_of_a_text_model():
    class TextWithValidation(LSTMTextClassifier):
        def validation_step(self, batch, batch_idx):
            pass

    ids, labels = _text_batch(32, length=8)
    data = DictDataset(input_ids=ids, labels=labels)
    callback = AttributionMetrics(
        method="saliency",
        metrics=["rationale_consistency", "dataset_consistency"],
        num_samples=32,
        pictures_every_n_epochs=0,
    )
    seen = {}
    original = DatasetConsistency.update

    def spy(self, *args, **kwargs):
        seen["token_ids"] = kwargs.get("token_ids")
        return original(self, *args, **kwargs)

    run = trainer(max_epochs=1, callbacks=[callback])
    model = TextWithValidation()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DatasetConsistency, "update", spy)
        run.fit(model, loader(data, 16), loader(data, 16))
    metrics = callback._metrics(model)
    assert metrics["rationale_consistency"].feature_dims == (1,)  # saliency per token: summed over the embedding
    assert torch.equal(seen["token_ids"].cpu().sort(0).values, ids.sort(0).values)
    for name in ("rationale_consistency", "dataset_consistency"):
        value = run.callback_metrics[f"attr/saliency/{name}"].item()
        assert -1 <= value <= 1, name


@pytest.mark.ddp
def test_callback_under_ddp_spawn_gives_the_single_process_values():
    # 16 validation samples, probe of 16: one process explains all of them, two ranks 8 each; pairs are drawn from
    # the gathered probe in a canonical order, so both runs correlate the same pairs.
    from tests.helpers import assert_ddp_matches_single

    def make_model():
        torch.manual_seed(0)
        return ValidatingCNN()

    assert_ddp_matches_single(
        make_model,
        lambda: [
            AttributionMetrics(
                method="saliency",
                metrics=["rationale_consistency", "dataset_consistency"],
                num_samples=16,
                pictures_every_n_epochs=0,
                metric_kwargs={"dataset_consistency": {"num_pairs": 40}},
            )
        ],
        _digits(16, "val"),
        batch_size=16,
        stage="validate",
        prefixes=("attr/",),
        atol=1e-6,
        rtol=1e-4,
        parameters=False,
    )
