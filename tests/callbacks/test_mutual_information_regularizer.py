"""MutualInformationRegularizer inside real training loops: effect, exact gradients, DDP, resume, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from lightning_xai.callbacks import MutualInformationRegularizer
from lightning_xai.errors import GroupValueError, MissingBatchKeyError, XAIConfigurationError
from lightning_xai.functional import mutual_information_penalty
from lightning_xai.samplers import StratifiedBatchSampler
from tests.helpers import MLP, DictDataset, loader, tiny_bert_config, trainer


def planted(n: int = 2000, seed: int = 0):
    """Labels depend on a signal and on sex; the model sees sex (and race) as inputs."""
    g = torch.Generator().manual_seed(seed)
    sex = torch.randint(0, 2, (n,), generator=g)
    race = torch.randint(0, 3, (n,), generator=g)
    signal = torch.randn(n, generator=g)
    target = (signal + 1.5 * (sex - 0.5) + 0.3 * torch.randn(n, generator=g) > 0).long()
    x = torch.stack([signal, sex.float(), race.float() / 2, torch.randn(n, generator=g)], dim=1)
    return {"input": x, "target": target, "sex": sex, "race": race, "signal_label": (signal > 0).long()}


def fit(data, callbacks, epochs: int = 15, batch_size: int = 200, seed: int = 0, **trainer_kwargs):
    torch.manual_seed(seed)
    model = MLP(lr=0.02)
    train = {k: v for k, v in data.items() if k != "signal_label"}
    run = trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    run.fit(model, loader(DictDataset(**train), batch_size, shuffle=True))
    return model.eval(), run


def evaluate(model, data):
    with torch.no_grad():
        probs = model(data["input"]).softmax(1)
    groups = torch.stack([data["sex"], data["race"]], 1)
    return {
        "mi": mutual_information_penalty(probs, groups, [2, 3]).item(),
        "accuracy_on_signal": (probs.argmax(1) == data["signal_label"]).float().mean().item(),
        "accuracy": (probs.argmax(1) == data["target"]).float().mean().item(),
    }


def test_regularizer_removes_a_planted_dependence_and_keeps_the_signal():
    data = planted()
    baseline = evaluate(fit(data, [])[0], data)
    regularizer = MutualInformationRegularizer(attributes=["sex", "race"], num_values=[2, 3], weight=10.0)
    regularized = evaluate(fit(data, [regularizer])[0], data)
    assert baseline["mi"] > 0.1  # the unregularized model uses sex
    assert regularized["mi"] < 0.05 * baseline["mi"] and regularized["mi"] < 0.005  # 0.134 -> 0.0019 measured
    # what is left is the non-protected signal: a group-blind model's best guess of sign(signal)
    assert regularized["accuracy_on_signal"] > 0.92 > 0.75 > baseline["accuracy_on_signal"]  # 0.94 vs 0.73
    assert regularizer.steps_seen == 15 * 10 and regularizer.steps_skipped == 0


@pytest.mark.parametrize("estimator", ["plugin", "chi2", "hsic"])
@pytest.mark.parametrize("conditional", [False, True])
def test_one_sgd_step_equals_task_loss_plus_weighted_penalty(estimator, conditional):
    data = planted(64)
    torch.manual_seed(0)
    model = MLP(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    regularizer = MutualInformationRegularizer(
        ["sex", "race"], [2, 3], weight=3.0, estimator=estimator, conditional_on_target=conditional
    )
    run = trainer(max_steps=1, callbacks=[regularizer])
    run.fit(model, loader(DictDataset(**data), 64))
    assert forwards == [64]  # the step's own forward: no second one

    logits = reference(data["input"])
    penalty = mutual_information_penalty(
        logits.softmax(1),
        torch.stack([data["sex"], data["race"]], 1),
        [2, 3],
        data["target"],
        estimator=estimator,
        conditional_on_target=conditional,
    )
    assert run.callback_metrics["xai/mutual_information_step"].item() == pytest.approx(penalty.item(), rel=1e-5)
    loss = F.cross_entropy(logits, data["target"]) + 3.0 * penalty
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient, atol=1e-6, rtol=1e-5)


class TwoHeadModel(MLP):
    """Its training step calls the classifier submodule directly, not ``self(x)``."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["input"]), batch["target"])


def test_output_layer_reads_a_submodule_and_a_missing_output_is_named():
    data = planted(32)
    regularizer = MutualInformationRegularizer(["sex"], [2], weight=1.0, output_layer="net")
    trainer(max_steps=2, callbacks=[regularizer]).fit(TwoHeadModel(), loader(DictDataset(**data), 16))
    assert regularizer.steps_seen == 2 and regularizer.last_value >= 0
    with pytest.raises(XAIConfigurationError, match="returned no output with 16 rows"):
        trainer(max_steps=1, callbacks=[MutualInformationRegularizer(["sex"], [2])]).fit(
            TwoHeadModel(), loader(DictDataset(**data), 16)
        )
    with pytest.raises(XAIConfigurationError, match="has no submodule 'classifier'"):
        trainer(max_steps=1, callbacks=[MutualInformationRegularizer(["sex"], [2], output_layer="classifier")]).fit(
            MLP(), loader(DictDataset(**data), 16)
        )


def test_groups_key_missing_attributes_and_bad_values_raise_named_errors():
    data = planted(32)
    groups_batch = {
        "input": data["input"],
        "target": data["target"],
        "groups": torch.stack([data["sex"], data["race"]], 1),
    }
    regularizer = MutualInformationRegularizer(["sex", "race"], [2, 3])
    trainer(max_steps=1, callbacks=[regularizer]).fit(MLP(), loader(DictDataset(**groups_batch), 32))
    assert regularizer.last_value > 0
    no_race = {k: v for k, v in data.items() if k != "race"}
    with pytest.raises(MissingBatchKeyError, match=r"needs the protected attributes \['race'\]"):
        trainer(max_steps=1, callbacks=[MutualInformationRegularizer(["sex", "race"], [2, 3])]).fit(
            MLP(), loader(DictDataset(**no_race), 32)
        )
    with pytest.raises(GroupValueError, match=r"'race' has the value 2, outside \[0, 2\)"):
        trainer(max_steps=1, callbacks=[MutualInformationRegularizer(["sex", "race"], [2, 2])]).fit(
            MLP(), loader(DictDataset(**data), 32)
        )
    with pytest.raises(XAIConfigurationError, match="num_values has 1 entries for 2 attributes"):
        MutualInformationRegularizer(["sex", "race"], [2])
    with pytest.raises(XAIConfigurationError, match="momentum"):
        MutualInformationRegularizer(["sex"], [2], momentum=1.0)


def test_batches_missing_cells_or_with_one_class_train_without_nan():
    data = planted(64)
    order = torch.argsort(data["sex"] * 3 + data["race"])  # sorted: most batches hold one or two cells
    sorted_data = {k: v[order] for k, v in data.items()}
    sorted_data["target"] = torch.zeros_like(sorted_data["target"])  # a single class everywhere
    regularizer = MutualInformationRegularizer(["sex", "race"], [2, 3], weight=10.0, conditional_on_target=True)
    model = MLP()
    trainer(max_epochs=2, callbacks=[regularizer]).fit(model, loader(DictDataset(**sorted_data), 8))
    assert regularizer.steps_skipped == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_running_statistics_survive_checkpoint_resume(tmp_path):
    data = planted(128)
    regularizer = MutualInformationRegularizer(["sex", "race"], [2, 3], momentum=0.9)
    run = trainer(max_epochs=2, callbacks=[regularizer], enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(MLP(), loader(DictDataset(**data), 32))
    checkpoint = tmp_path / "last.ckpt"
    run.save_checkpoint(checkpoint)
    saved_sums = regularizer.running_sums.clone()

    resumed = MutualInformationRegularizer(["sex", "race"], [2, 3], momentum=0.9)
    seen = {}

    def on_train_start(trainer, pl_module):
        seen["sums"] = resumed.running_sums.clone()
        seen["steps"] = resumed.steps_seen

    resumed.on_train_start = on_train_start
    trainer(max_epochs=3, callbacks=[resumed]).fit(MLP(), loader(DictDataset(**data), 32), ckpt_path=checkpoint)
    torch.testing.assert_close(seen["sums"], saved_sums)
    assert seen["steps"] == 8 and resumed.steps_seen == 12


def test_momentum_evaluates_the_estimate_at_running_statistics():
    data = planted(64)
    regularizer = MutualInformationRegularizer(["sex", "race"], [2, 3], momentum=0.5)
    trainer(max_steps=2, callbacks=[regularizer]).fit(MLP(), loader(DictDataset(**data), 32))
    # after two batches the running sums are half the first batch's plus half the second's
    assert regularizer.running_counts.sum().item() == pytest.approx(32.0)


def test_bf16_mixed_precision_gives_the_fp32_penalty():
    data = planted(64)
    values = {}
    for precision in ("32-true", "bf16-mixed"):
        regularizer = MutualInformationRegularizer(["sex", "race"], [2, 3])
        torch.manual_seed(0)
        trainer(max_steps=1, precision=precision, callbacks=[regularizer]).fit(MLP(), loader(DictDataset(**data), 64))
        values[precision] = regularizer.last_value
    assert values["bf16-mixed"] == pytest.approx(values["32-true"], rel=0.05)


def test_gradient_accumulation_of_two_halves_uses_each_halfs_estimate():
    data = planted(64)
    torch.manual_seed(0)
    model = MLP(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    trainer(
        max_steps=1, accumulate_grad_batches=2, callbacks=[MutualInformationRegularizer(["sex"], [2], weight=2.0)]
    ).fit(model, loader(DictDataset(**data), 32))
    loss = 0
    for half in (slice(0, 32), slice(32, 64)):
        logits = reference(data["input"][half])
        penalty = mutual_information_penalty(logits.softmax(1), data["sex"][half], [2])
        loss = loss + (F.cross_entropy(logits, data["target"][half]) + 2.0 * penalty) / 2
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient, atol=1e-6, rtol=1e-5)


def test_stratified_batches_hold_every_cell_in_proportion():
    data = planted(1000)
    cells = (data["sex"] * 3 + data["race"]).tolist()
    sampler = StratifiedBatchSampler(cells, batch_size=64, seed=3)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))  # every example once
    sizes = {len(batch) for batch in batches}
    assert max(sizes) <= 64 and max(sizes) - min(sizes) <= 1
    totals = torch.bincount(torch.tensor(cells), minlength=6)
    for batch in batches:
        counts = torch.bincount(torch.tensor([cells[i] for i in batch]), minlength=6)
        expected = totals / len(batches)
        assert ((counts - expected).abs() <= 1).all()
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch
    dropped = StratifiedBatchSampler(cells, batch_size=64, drop_last=True)
    assert {len(b) for b in dropped} == {64} and len(list(dropped)) == 1000 // 64
    ranks = [list(StratifiedBatchSampler(cells, 64, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))


def test_stratified_sampler_lowers_the_estimate_of_an_independent_model():
    # predictions independent of the groups: the estimate is pure small-sample bias
    g = torch.Generator().manual_seed(0)
    n = 4000
    groups = torch.stack([torch.randint(0, 2, (n,), generator=g), (torch.rand(n, generator=g) < 0.1).long() * 2], 1)
    probs = torch.rand(n, generator=g)
    cells = (groups[:, 0] * 3 + groups[:, 1]).tolist()
    stratified = [
        mutual_information_penalty(probs[b], groups[b], [2, 3]).item() for b in StratifiedBatchSampler(cells, 32)
    ]
    random = [
        mutual_information_penalty(probs[b], groups[b], [2, 3]).item() for b in torch.randperm(n, generator=g).split(32)
    ]
    assert sum(stratified) / len(stratified) < sum(random) / len(random)


def test_hugging_face_model_output_is_read_through_output_layer():
    transformers = pytest.importorskip("transformers")
    import pytorch_lightning as pl

    from lightning_xai import XAIMixin

    class BertClassifier(XAIMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            config = tiny_bert_config()
            torch.manual_seed(0)
            self.bert = transformers.BertForSequenceClassification(config)

        def training_step(self, batch, batch_idx):
            # the module's own forward is not used: the ModelOutput of the submodule holds the logits
            return self.bert(input_ids=batch["input_ids"], labels=batch["target"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    n = 16
    data = {
        "input_ids": torch.randint(0, 30, (n, 6), generator=g),
        "target": torch.randint(0, 2, (n,), generator=g),
        "sex": torch.randint(0, 2, (n,), generator=g),
    }
    model = BertClassifier()
    with torch.no_grad():
        logits = model.bert(input_ids=data["input_ids"]).logits
    expected = mutual_information_penalty(logits.softmax(1), data["sex"], [2])
    regularizer = MutualInformationRegularizer(["sex"], [2], weight=1.0, output_layer="bert")
    trainer(max_steps=1, callbacks=[regularizer]).fit(model, loader(DictDataset(**data), n))
    assert regularizer.last_value == pytest.approx(expected.item(), rel=1e-4)
