import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.attribution import contextual_decomposition
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.datasets import DecoyDigits
from lightning_xai.errors import MaskShapeError, MissingBatchKeyError, MissingMixinError, XAIConfigurationError
from lightning_xai.functional import (
    ablation_penalty,
    cdep_penalty,
    counterexample_inputs,
    counterexample_loss,
    expected_gradients_penalty,
    hint_penalty,
    input_x_gradient_penalty,
    rbr_penalty,
    rrr_gradcam_penalty,
    rrr_penalty,
)
from lightning_xai.masks import OccupancyMaskSampler
from tests.helpers import (
    MLP,
    DictDataset,
    LSTMTextClassifier,
    SmallCNN,
    SmallCNNBody,
    TupleDataset,
    bind,
    decoy_tabular,
    loader,
    token_decoy_data,
    trainer,
)

METHODS = ["cdep", "rrr", "expected_gradients", "input_x_gradient", "ablation", "rbr", "counterexamples"]


def _functional_penalty(method, model, x, y, mask):
    if method == "rbr":
        return rbr_penalty(model, x, mask, y, list(model.parameters()))
    if method == "counterexamples":  # the penalty's stream with seed 0 draws the same copies
        return counterexample_loss(model, counterexample_inputs(x, mask, torch.Generator().manual_seed(0)), y)
    if method == "cdep":
        return cdep_penalty(*contextual_decomposition(model, x, mask))
    if method == "ablation":
        return ablation_penalty(model, x, mask)
    if method == "rrr":
        return rrr_penalty(model, x, mask)
    if method == "input_x_gradient":
        return input_x_gradient_penalty(model, x, mask, y)
    return expected_gradients_penalty(model, x, mask, y, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch_kind", ["tuple", "dict"])
@pytest.mark.parametrize("method", METHODS)
def test_one_step_adds_exactly_the_weighted_penalty_gradient(method, batch_kind):
    torch.manual_seed(0)
    x, y, mask = decoy_tabular(8)
    dataset = TupleDataset(x, y, mask) if batch_kind == "tuple" else DictDataset(input=x, target=y, mask=mask)
    model = MLP(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    weight = 3.0
    run = trainer(max_steps=1, callbacks=[ExplanationPenalty(method=method, weight=weight)])
    run.fit(model, loader(dataset, 8))

    loss = F.cross_entropy(reference(x), y) + weight * _functional_penalty(method, reference, x, y, mask)
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient, atol=1e-5, rtol=1e-4)
    logged = run.callback_metrics
    assert logged[f"xai/{method}_step"].item() == pytest.approx(
        _functional_penalty(method, reference, x, y, mask).item(), rel=1e-4
    )
    assert logged["xai/total_step"].item() == pytest.approx(weight * logged[f"xai/{method}_step"].item(), rel=1e-5)


DECOY_CASES = {
    # The paper's CDEP variant can be lowered by raising every irrelevant logit, so it only partly removes the
    # decoy here; the shift-invariant variant cannot be gamed that way.
    "cdep_paper": (dict(method="cdep", weight=100.0), 0.55),
    "cdep_shift_invariant": (dict(method="cdep", weight=20.0, cdep_variant="shift_invariant"), 0.85),
    "rrr": (dict(method="rrr", weight=10.0), 0.75),
    "expected_gradients": (dict(method="expected_gradients", weight=50.0), 0.75),
    "input_x_gradient": (dict(method="input_x_gradient", weight=50.0), 0.75),
    "ablation": (dict(method="ablation", weight=10.0), 0.75),
    "rbr": (dict(method="rbr", weight=1e4), 0.75),
    "counterexamples": (dict(method="counterexamples", weight=1.0), 0.75),
}


@pytest.mark.parametrize("case", sorted(DECOY_CASES))
def test_penalty_stops_the_model_from_using_the_decoy(case):
    arguments, threshold = DECOY_CASES[case]
    x, y, mask = decoy_tabular(256, seed=0)
    x_test, y_test, _ = decoy_tabular(512, seed=1, reversed_decoy=True)
    accuracies = {}
    for penalised in (False, True):
        torch.manual_seed(0)
        model = MLP(lr=0.02)
        callbacks = [ExplanationPenalty(**arguments)] if penalised else []
        trainer(max_epochs=15, callbacks=callbacks).fit(model, loader(DictDataset(input=x, target=y, mask=mask), 64))
        with torch.no_grad():
            accuracies[penalised] = (model(x_test).argmax(1) == y_test).float().mean().item()
    # Vanilla follows the decoy, which is reversed at test time; the penalised model reads the signal.
    assert accuracies[False] < 0.2
    assert accuracies[True] > threshold


def test_dict_returning_step_and_extra_keys_are_kept():
    class DictStep(MLP):
        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch["input"]), batch["target"])
            return {"loss": loss, "plain": loss.detach()}

    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update(outputs)

    x, y, mask = decoy_tabular(8)
    trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", weight=2.0), Spy()]).fit(
        DictStep(), loader(DictDataset(input=x, target=y, mask=mask), 8)
    )
    assert seen["loss"].item() > seen["plain"].item()  # the penalty was added to 'loss' only


def test_gradient_accumulation_equals_one_large_batch():
    x, y, mask = decoy_tabular(8)
    data = DictDataset(input=x, target=y, mask=mask)
    torch.manual_seed(0)
    accumulated, large = MLP(optimizer="sgd", lr=0.5), None
    large = copy.deepcopy(accumulated)
    trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[ExplanationPenalty(method="rrr", weight=5.0)]).fit(
        accumulated, loader(data, 4)
    )
    trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", weight=5.0)]).fit(large, loader(data, 8))
    for a, b in zip(accumulated.parameters(), large.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_resume_from_checkpoint_continues_schedule_and_counters(tmp_path):
    x, y, mask = decoy_tabular(64)
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    penalty = ExplanationPenalty(method="rrr", weight=4.0, schedule="linear_warmup", warmup_steps=10)
    first = trainer(max_steps=3, callbacks=[penalty])
    first.fit(MLP(), data)
    assert penalty.last_weight == pytest.approx(4.0 * 2 / 10)
    checkpoint = tmp_path / "three.ckpt"
    first.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][penalty.state_key]
    assert saved["steps_seen"] == 2  # the weight is 0 at step 0, so the term is not even computed there

    resumed_penalty = ExplanationPenalty(method="rrr", weight=4.0, schedule="linear_warmup", warmup_steps=10)
    second = trainer(max_steps=6, callbacks=[resumed_penalty])
    second.fit(MLP(), data, ckpt_path=checkpoint)
    assert resumed_penalty.steps_seen == 5  # 2 restored + 3 new
    assert resumed_penalty.last_weight == pytest.approx(4.0 * 5 / 10)  # step 5 of the warm-up, not step 2


def test_dann_schedule_grows_with_progress():
    x, y, mask = decoy_tabular(32)
    penalty = ExplanationPenalty(method="rrr", weight=1.0, schedule="dann")
    trainer(max_epochs=2, callbacks=[penalty]).fit(MLP(), loader(DictDataset(input=x, target=y, mask=mask), 8))
    # last step is global step 7 of 8: p = 7/8
    assert penalty.last_weight == pytest.approx(2 / (1 + torch.exp(torch.tensor(-10 * 7 / 8)).item()) - 1)


def test_sampler_masks_resume_to_the_same_draws(tmp_path):
    sampler = OccupancyMaskSampler(num_masks=2, seed=3)
    data = torch.rand(10, 1, 4, 4)
    first = sampler.sample(data)
    state = copy.deepcopy(sampler.state_dict())
    second = sampler.sample(data)
    restored = OccupancyMaskSampler(num_masks=2, seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored.sample(data), second) and not torch.equal(first, second)


def test_cdep_with_occupancy_sampler_on_images():
    digits = DecoyDigits("train")
    data = DictDataset(input=digits.images[:64], target=digits.targets[:64])
    penalty = ExplanationPenalty(method="cdep", weight=1.0, mask_sampler=OccupancyMaskSampler(num_masks=3))
    run = trainer(max_steps=2, callbacks=[penalty])
    run.fit(SmallCNN(), loader(data, 32))
    assert 0 < run.callback_metrics["xai/cdep_step"].item() < 1
    assert penalty.mask_sampler.occupancy.shape == (12, 12)


def test_samples_without_annotation_are_skipped():
    x, y, mask = decoy_tabular(8)
    annotations = [m if i % 2 == 0 else None for i, m in enumerate(mask)]
    model = MLP()
    batch = {"input": x, "target": y, "mask": annotations}
    penalty = ExplanationPenalty(method="rrr")
    run = trainer(max_steps=1, callbacks=[penalty])
    reference = copy.deepcopy(model)
    run.fit(model, loader([batch], 1, collate_fn=lambda items: items[0]))
    expected = rrr_penalty(reference, x, mask, sample_weights=torch.tensor([1.0, 0] * 4))
    everything = rrr_penalty(reference, x, mask)
    assert run.callback_metrics["xai/rrr_step"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() < everything.item()


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_without_any_annotation_costs_no_extra_forward(method, monkeypatch):
    from lightning_xai.callbacks import explanation_penalty as module

    x, y, _ = decoy_tabular(8)
    batch = {"input": x, "target": y, "mask": [None] * 8}
    forwards, decompositions = [], []
    real_decompose = module.decompose
    monkeypatch.setattr(module, "decompose", lambda *a, **k: decompositions.append(1) or real_decompose(*a, **k))

    class Counting(MLP):
        def forward(self, inputs):
            if isinstance(inputs, torch.Tensor):  # not the symbolic trace CD takes of the model in setup
                forwards.append(inputs.shape[0])
            return self.net(inputs)

    model = Counting(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    penalty = ExplanationPenalty(method=method, weight=100.0)
    run = trainer(max_steps=1, callbacks=[penalty])
    run.fit(model, loader([batch], 1, collate_fn=lambda items: items[0]))
    # one forward (the task loss), no decomposition, and exactly the vanilla update
    assert forwards == [8] and decompositions == [] and penalty.steps_sharing_forward == 0
    assert run.callback_metrics[f"xai/{method}_step"].item() == 0.0
    gradients = torch.autograd.grad(F.cross_entropy(reference.net(x), y), list(reference.parameters()))
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient)


# ------------------------------------------------------------------------------------- text


def _text_loader(n=64, batch_size=16):
    ids, labels, spans = token_decoy_data(n)
    items = [{"input_ids": ids[i], "labels": labels[i], "rationale": [(2, 3)]} for i in range(n)]

    def collate(batch):
        return {
            "input_ids": torch.stack([b["input_ids"] for b in batch]),
            "labels": torch.stack([b["labels"] for b in batch]),
            "rationale": [b["rationale"] for b in batch],
        }

    return loader(items, batch_size, collate_fn=collate), ids, labels


# Squared gradients with respect to embeddings are small: gradient penalties on text need a larger lambda.
TEXT_WEIGHTS = {"cdep": 10.0, "rrr": 1000.0, "input_x_gradient": 1000.0, "expected_gradients": 10.0, "ablation": 10.0}


@pytest.mark.parametrize("method", sorted(TEXT_WEIGHTS))
def test_lstm_text_penalties_on_token_spans(method):
    data, ids, labels = _text_loader()
    variant = "text" if method == "cdep" else "image"
    torch.manual_seed(0)
    model = LSTMTextClassifier()
    span_mask = torch.zeros_like(ids, dtype=torch.float)
    span_mask[:, 2] = 1
    before = _decoy_reliance(model, ids, labels, span_mask)
    penalty = ExplanationPenalty(method=method, weight=TEXT_WEIGHTS[method], mask_key="rationale", cdep_variant=variant)
    run = trainer(max_epochs=10, callbacks=[penalty])
    run.fit(model, data)
    assert torch.isfinite(run.callback_metrics[f"xai/{method}_step"])
    torch.manual_seed(0)
    vanilla = LSTMTextClassifier()
    trainer(max_epochs=10).fit(vanilla, data)
    # the vanilla model learns to read the decoy token; the penalised one relies on it much less
    assert _decoy_reliance(vanilla, ids, labels, span_mask) > before
    assert _decoy_reliance(model, ids, labels, span_mask) < 0.5 * _decoy_reliance(vanilla, ids, labels, span_mask)


def _decoy_reliance(model, ids, labels, span_mask):
    """Mean change of the true-class probability when the decoy token is replaced by a neutral one."""
    occluded = ids.clone()
    occluded[span_mask.bool()] = 0
    with torch.no_grad():
        p = torch.softmax(model(ids), 1).gather(1, labels.view(-1, 1))
        p_occluded = torch.softmax(model(occluded), 1).gather(1, labels.view(-1, 1))
    return (p - p_occluded).abs().mean().item()


def test_gradient_penalty_on_text_without_embedding_hooks_explains_the_fix():
    class NoHooks(LSTMTextClassifier):
        xai_embed = XAIMixin.xai_embed

    data, _, _ = _text_loader(16, 8)
    with pytest.raises(XAIConfigurationError, match="xai_embed"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", mask_key="rationale")]).fit(NoHooks(), data)


# ------------------------------------------------------------------------------------- errors


def test_module_without_mixin_fails_in_setup_with_the_fix():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.net(batch["input"]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y, mask = decoy_tabular(8)
    with pytest.raises(MissingMixinError, match=r"class Plain\(XAIMixin, LightningModule\)"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty()]).fit(
            Plain(), loader(DictDataset(input=x, target=y, mask=mask), 8)
        )


def test_missing_batch_key_names_callback_key_and_available_keys():
    x, y, _ = decoy_tabular(8)
    with pytest.raises(
        MissingBatchKeyError, match=r"ExplanationPenalty\(method='rrr'.*'forbidden'.*\['input', 'target'\]"
    ):
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", mask_key="forbidden")]).fit(
            MLP(), loader(DictDataset(input=x, target=y), 8)
        )


def test_wrong_mask_shape_names_callback_and_key():
    x, y, _ = decoy_tabular(8)
    with pytest.raises(MaskShapeError, match=r"batch key 'mask'.*\(8, 3\)"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="cdep")]).fit(
            MLP(), loader(DictDataset(input=x, target=y, mask=torch.ones(8, 3)), 8)
        )


def test_duplicate_term_names_and_bad_arguments_are_refused():
    x, y, mask = decoy_tabular(8)
    with pytest.raises(RuntimeError, match="state_key"):  # Lightning's own check of unique state keys
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr"), ExplanationPenalty(method="rrr")]).fit(
            MLP(), loader(DictDataset(input=x, target=y, mask=mask), 8)
        )
    with pytest.raises(XAIConfigurationError, match="method must be one of"):
        ExplanationPenalty(method="lrp")
    with pytest.raises(XAIConfigurationError, match="warmup_steps > 0"):
        ExplanationPenalty(schedule="linear_warmup")
    with pytest.raises(XAIConfigurationError, match="weight must be"):
        ExplanationPenalty(weight=float("nan"))


def test_manual_optimization_requires_xai_loss_and_works_with_it():
    class Manual(MLP):
        def __init__(self, call_xai_loss):
            super().__init__(optimizer="sgd", lr=0.5)
            self.automatic_optimization = False
            self.call_xai_loss = call_xai_loss

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = F.cross_entropy(self(batch["input"]), batch["target"])
            if self.call_xai_loss:
                loss = loss + self.xai_loss(batch)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    x, y, mask = decoy_tabular(8)
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    with pytest.raises(XAIConfigurationError, match=r"self\.xai_loss\(batch\)"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr")]).fit(Manual(False), data)

    torch.manual_seed(0)
    manual = Manual(True)
    automatic = MLP(optimizer="sgd", lr=0.5)
    automatic.load_state_dict(manual.state_dict())
    trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", weight=2.0)]).fit(manual, data)
    trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", weight=2.0)]).fit(automatic, data)
    for a, b in zip(manual.parameters(), automatic.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_non_finite_term_is_skipped_with_a_warning():
    x, y, mask = decoy_tabular(8)
    x[0, 1] = float("nan")
    penalty = ExplanationPenalty(method="rrr")
    model = MLP()
    with pytest.warns(UserWarning, match="left out of this step's loss"):
        trainer(max_steps=1, callbacks=[penalty]).fit(model, loader(DictDataset(input=x, target=y, mask=mask), 8))
    assert penalty.steps_skipped == 1


def test_bf16_autocast_penalties_are_close_to_fp32():
    x, y, mask = decoy_tabular(16)
    data = loader(DictDataset(input=x, target=y, mask=mask), 16)
    for method in ("cdep", "rrr"):
        values = {}
        for precision in ("32-true", "bf16-mixed"):
            torch.manual_seed(0)
            run = trainer(max_steps=1, precision=precision, callbacks=[ExplanationPenalty(method=method)])
            run.fit(MLP(), data)
            values[precision] = run.callback_metrics[f"xai/{method}_step"].item()
        assert values["bf16-mixed"] == pytest.approx(values["32-true"], rel=0.05)


def test_cdep_shares_the_step_forward_only_when_train_and_eval_agree():
    x, y, mask = decoy_tabular(16)
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    shared = ExplanationPenalty(method="cdep")
    trainer(max_steps=2, callbacks=[shared]).fit(MLP(), data)
    assert shared.steps_sharing_forward == 2  # the decomposition's total stream was the step's forward

    class WithDropout(MLP):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)
            )

    separate = ExplanationPenalty(method="cdep")
    model = WithDropout()
    trainer(max_steps=2, callbacks=[separate]).fit(model, data)
    assert separate.steps_sharing_forward == 0 and separate.steps_seen == 2
    assert "forward" not in model.__dict__  # the instance-level override is removed after each step


# ------------------------------------------------------------------------------------- Grad-CAM methods


@pytest.mark.parametrize("method", ["rrr_gradcam", "hint"])
def test_gradcam_methods_add_exactly_the_functional_penalty_at_the_default_layer(method):
    digits = DecoyDigits("train")
    x, y, mask = digits.images[:16], digits.targets[:16], digits.masks[:16]
    torch.manual_seed(0)
    model = SmallCNN()
    reference = copy.deepcopy(model)
    penalty = ExplanationPenalty(method=method, weight=2.0)
    run = trainer(max_steps=1, callbacks=[penalty])
    run.fit(model, loader(DictDataset(input=x, target=y, mask=mask), 16))
    assert penalty.layer_module is model.features[3]  # the last convolution
    layer = reference.features[3]
    if method == "hint":  # without relevant_key HINT is told to look everywhere but the mask
        expected = hint_penalty(reference, x, 1 - mask, layer, y)
    else:
        expected = rrr_gradcam_penalty(reference, x, mask, layer)
    gradients = torch.autograd.grad(F.cross_entropy(reference(x), y) + 2.0 * expected, list(reference.parameters()))
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.1 * gradient, atol=1e-5, rtol=1e-4)
    assert run.callback_metrics[f"xai/{method}_step"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_hint_reads_its_relevant_region_from_relevant_key_and_skips_samples_without_one():
    digits = DecoyDigits("train")
    x, y = digits.images[:8], digits.targets[:8]
    relevant = [((x[i] * (1 - digits.masks[i])) > 0).float() if i % 2 else None for i in range(8)]
    model = SmallCNN()
    reference = copy.deepcopy(model)
    run = trainer(max_steps=1, callbacks=[ExplanationPenalty("hint", weight=1.0, relevant_key="digit")])
    batch = {"input": x, "target": y, "digit": relevant}
    run.fit(model, loader([batch], 1, collate_fn=lambda items: items[0]))
    stacked = torch.stack([r if r is not None else torch.zeros_like(x[0]) for r in relevant])
    expected = hint_penalty(reference, x, stacked, reference.features[3], y, sample_weights=torch.tensor([0.0, 1] * 4))
    assert run.callback_metrics["xai/hint_step"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_layer_arguments_are_checked_when_built_and_in_setup():
    with pytest.raises(XAIConfigurationError, match="reads no layer"):
        ExplanationPenalty("rrr", layer="features.0")
    with pytest.raises(XAIConfigurationError, match="relevant_key is HINT's annotation"):
        ExplanationPenalty("rrr", relevant_key="digit")
    x, y, mask = decoy_tabular(8)
    with pytest.raises(XAIConfigurationError, match="no Conv2d, Conv1d or recurrent layer"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr_gradcam")]).fit(
            MLP(), loader(DictDataset(input=x, target=y, mask=mask), 8)
        )
    with pytest.raises(XAIConfigurationError, match="has no submodule 'features.9'"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty("hint", layer="features.9")]).fit(
            SmallCNN(), loader(DictDataset(input=torch.rand(8, 1, 12, 12), target=y, mask=torch.ones(8, 1, 12, 12)), 8)
        )


def test_a_term_that_dwarfs_the_task_loss_warns_once_with_the_methods_weight_range():
    x, y, mask = decoy_tabular(64)
    data = loader(DictDataset(input=x, target=y, mask=mask), 16)
    with pytest.warns(
        UserWarning, match=r"times the task loss .* weights that worked for this method lie in \(1.0, 1000.0\)"
    ) as caught:
        trainer(max_steps=4, callbacks=[ExplanationPenalty("rrr", weight=1e7)]).fit(MLP(), data)
    assert sum("times the task loss" in str(w.message) for w in caught) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*times the task loss.*")
        trainer(max_steps=4, callbacks=[ExplanationPenalty("rrr", weight=1.0)]).fit(MLP(), data)


class _GlobalPoolCNNBody(SmallCNNBody):
    """Convolutions and global average pooling: Grad-CAM is then exactly CAM, so it shows what the head reads.

    Behind a dense head over positions the channel weights of Grad-CAM average a position's gradient away, and
    a model trained against RRR-G or HINT hides a decoy that way (see the docs).
    """

    def __init__(self):
        super().__init__(classes=2)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

    def forward(self, x):
        return self.head(self.features(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


GlobalPoolCNN = bind(_GlobalPoolCNNBody)


def _bar_images(n: int, seed: int, reversed_decoy: bool = False):
    """A faint bar (vertical: class 1, horizontal: class 0) in noise, and a bright corner patch on class 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 12, 12, generator=g)
    x[y == 1, 0, 3:9, 6] += 0.5
    x[y == 0, 0, 6, 3:9] += 0.5
    decoy = (1 - y if reversed_decoy else y).bool()
    x[decoy, 0, :2, :2] = 1.5
    mask = torch.zeros(n, 1, 12, 12)
    mask[:, 0, :2, :2] = 1
    relevant = torch.zeros(n, 1, 12, 12)
    relevant[:, 0, 3:9, 3:9] = 1
    return x, y, mask, relevant


IMAGE_DECOY_CASES = {  # reversed-decoy accuracy the penalised model must reach (vanilla: about 0.1)
    "hint": (dict(method="hint", weight=0.1, relevant_key="relevant"), 0.9),
    # RRR-G leaves the decoy (0.42 against 0.10) but, with a normalized map, larger weights flatten the map
    "rrr_gradcam": (dict(method="rrr_gradcam", weight=0.01), 0.35),
}


@pytest.mark.parametrize("case", sorted(IMAGE_DECOY_CASES))
def test_gradcam_penalties_stop_a_cnn_from_using_an_image_decoy(case):
    arguments, threshold = IMAGE_DECOY_CASES[case]
    x, y, mask, relevant = _bar_images(256, seed=0)
    x_test, y_test, _, _ = _bar_images(512, seed=1, reversed_decoy=True)
    accuracies = {}
    for penalised in (False, True):
        torch.manual_seed(0)
        model = GlobalPoolCNN()
        callbacks = [ExplanationPenalty(**arguments)] if penalised else []
        data = DictDataset(input=x, target=y, mask=mask, relevant=relevant)
        trainer(max_epochs=20, callbacks=callbacks).fit(model, loader(data, 64))
        with torch.no_grad():
            accuracies[penalised] = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracies[False] < 0.2
    assert accuracies[True] > threshold


def test_a_fitted_task_loss_near_zero_does_not_make_a_normal_term_look_dominant():
    # counterexamples at weight 1 on a fitted SST model: task loss 2e-4, term 0.26 (a false alarm before the floor)
    import warnings

    from lightning_xai.mixin import _warn_about_dominant_terms

    term = ExplanationPenalty("counterexamples", weight=1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*times the task loss.*")
        _warn_about_dominant_terms(
            [(term, 1.0, torch.tensor(0.26))], {term.term_name: torch.tensor(0.26)}, torch.tensor(2e-4), 481
        )
    assert not term.warned_dominance


@pytest.mark.parametrize(("method", "input_grad"), [("ablation", False), ("rrr", True)])
def test_reusing_the_step_forward_makes_inputs_require_grad_only_for_input_gradient_methods(method, input_grad):
    # ablation only needs the step's logits; an input gradient nobody reads cost it 40 % more per step
    x, y, mask = decoy_tabular(8)
    seen = []

    class Recording(MLP):
        def forward(self, inputs):
            seen.append(inputs.requires_grad)
            return self.net(inputs)

    penalty = ExplanationPenalty(method=method, weight=1.0)
    trainer(max_steps=1, callbacks=[penalty]).fit(Recording(), loader(DictDataset(input=x, target=y, mask=mask), 8))
    assert seen[0] is input_grad  # the step's own forward
    assert len(seen) == (2 if method == "ablation" else 1)  # ablation: its ablated batch; rrr: nothing more


# ------------------------------------------------------------------------ differentiation="finite_difference"


class _StepGradient(pl.Callback):
    """The parameter gradient of the first step (task loss plus penalty)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "flat"):
            self.flat = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None])


def _first_step(model, data, steps=1, **options):
    penalty, probe = ExplanationPenalty(**options), _StepGradient()
    run = trainer(max_steps=steps, callbacks=[penalty, probe])
    run.fit(model, data)
    return probe.flat, run.callback_metrics[f"xai/{penalty.term_name}_step"].item(), penalty


def _cnn_data():
    from tests.callbacks.test_composition import cnn_batch

    return loader(cnn_batch(16), 16)


FD_MODELS = {
    # ReLU and max pooling, the step's logits reused (its branches recorded for the shifted forward)
    "cnn": (lambda: SmallCNN(channels=1, size=8, classes=3), _cnn_data, {"weight": 3.0}),
    # the gradient is taken with respect to the token embeddings, which depend on the parameters too
    "lstm": (LSTMTextClassifier, lambda: _text_loader(16, 16)[0], {"weight": 1000.0, "mask_key": "rationale"}),
}


@pytest.mark.parametrize("model_kind", sorted(FD_MODELS))
@pytest.mark.parametrize("method", ["rrr", "input_x_gradient", "expected_gradients"])
def test_finite_difference_step_follows_the_double_backward_step(method, model_kind):
    make_model, make_data, options = FD_MODELS[model_kind]
    results = {}
    for differentiation in ("double_backward", "finite_difference"):
        torch.manual_seed(0)
        results[differentiation] = _first_step(
            make_model(), make_data(), method=method, differentiation=differentiation, **options
        )
    (exact, exact_value, _), (estimate, value, penalty) = results["double_backward"], results["finite_difference"]
    assert value == pytest.approx(exact_value, rel=1e-5)
    assert F.cosine_similarity(estimate, exact, dim=0) > 0.9999
    assert (estimate - exact).norm() / exact.norm() < 5e-3
    assert not penalty.differentiates_step_twice


class _CountedLSTM(pl.Callback):
    """Counts the LSTM's forwards and records whether each ran with oneDNN (the fused kernel) enabled."""

    def setup(self, trainer, pl_module, stage):
        self.calls, self.fused = 0, []

        def count(*_):
            self.calls += 1
            self.fused.append(torch.backends.mkldnn.enabled)

        pl_module.lstm.register_forward_hook(count)


class _ClonedIds(LSTMTextClassifier):
    """Computes what LSTMTextClassifier computes, from a copy of the ids: the step's embeddings are not found."""

    def forward(self, ids):
        return self.xai_forward_from_embeddings(self.embedding(ids.clone()), {})


class _ScaledEmbeddings(LSTMTextClassifier):
    """A forward that is not xai_forward_from_embeddings(xai_embed(ids)): it scales the embeddings."""

    def forward(self, ids):
        return self.xai_forward_from_embeddings(2.0 * self.embedding(ids), {})


def _counted_first_step(model, method="rrr", differentiation="finite_difference", fused=None):
    counter, probe = _CountedLSTM(), _StepGradient()
    penalty = ExplanationPenalty(method, weight=1000.0, mask_key="rationale", differentiation=differentiation)
    trainer(max_steps=2, callbacks=[penalty, probe, counter]).fit(model, _text_loader(32, 16)[0])
    if fused is not None:
        fused.extend(counter.fused)
    return probe.flat, counter.calls


@pytest.mark.parametrize("method", ["rrr", "input_x_gradient"])
def test_finite_difference_on_text_reuses_the_step_forward_on_its_embeddings(method):
    torch.manual_seed(0)
    shared, calls = _counted_first_step(LSTMTextClassifier(), method)
    torch.manual_seed(0)
    own, own_calls = _counted_first_step(_ClonedIds(), method)
    # per step the step's forward and the shifted one, instead of a third from embeddings of its own; the first
    # step checks once, without gradients, that xai_forward_from_embeddings gives the step's logits
    assert (calls, own_calls) == (2 + 2 + 1, 3 + 3)
    # the same estimate up to rounding, which the difference quotient magnifies (its own error is about 1e-3)
    assert (shared - own).norm() / own.norm() < 1e-3


@pytest.mark.parametrize("method", ["rrr", "input_x_gradient"])
def test_double_backward_on_text_differentiates_the_step_forward(method):
    torch.manual_seed(0)
    kernels = []
    shared, calls = _counted_first_step(LSTMTextClassifier(), method, "double_backward", kernels)
    torch.manual_seed(0)
    own, own_calls = _counted_first_step(_ClonedIds(), method, "double_backward")
    # the step's forward runs on the native LSTM kernel and is differentiated twice: one LSTM forward per step
    assert (calls, own_calls) == (2, 4)
    assert kernels == [False, False]
    assert (shared - own).norm() / own.norm() < 1e-5


class _TransformedEmbeddings(LSTMTextClassifier):
    """xai_embed returns a transform of the embedding's output: the step's embeddings are not what it explains."""

    def xai_embed(self, input_ids):
        return self.embedding(input_ids) * 1.0


def test_a_step_the_penalty_cannot_reuse_keeps_the_fused_rnn_kernel():
    kernels = []
    _, calls = _counted_first_step(_TransformedEmbeddings(), "rrr", "double_backward", kernels)
    # per step: the step's forward on oneDNN's fused LSTM, the penalty's own on the native one
    assert calls == 4
    assert kernels == [True, False, True, False]


class _SequenceLSTMBody(XAIMixin):
    """An LSTM over float feature sequences: the input gradient is taken with respect to the batch input."""

    def __init__(self, copy_inputs: bool = False):
        super().__init__()
        self.copy_inputs = copy_inputs
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])

    def training_step(self, batch, batch_idx):
        inputs = batch["input"].clone() if self.copy_inputs else batch["input"]
        return F.cross_entropy(self(inputs), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_double_backward_on_a_recurrent_model_differentiates_the_step_forward_on_the_native_kernel():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, 6, generator=g), torch.randint(0, 2, (16,), generator=g)
    mask = torch.zeros(16, 5, 6)
    mask[:, 1] = 1
    runs = {}
    for copy_inputs in (False, True):  # a copy hides the step's input: the penalty runs its own forward
        torch.manual_seed(0)
        model, counter, probe = bind(_SequenceLSTMBody)(copy_inputs), _CountedLSTM(), _StepGradient()
        penalty = ExplanationPenalty("rrr", weight=10.0)
        trainer(max_steps=2, callbacks=[penalty, probe, counter]).fit(
            model, loader(DictDataset(input=x, target=y, mask=mask), 8)
        )
        runs[copy_inputs] = probe.flat, counter.calls
    (shared, calls), (own, own_calls) = runs[False], runs[True]
    assert (calls, own_calls) == (2, 4)
    assert (shared - own).norm() / own.norm() < 1e-5


def test_finite_difference_on_text_runs_its_own_forward_where_the_step_computes_another_function():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"xai_forward_from_embeddings\(xai_embed\(ids\), batch\) does not give"):
        gradient, calls = _counted_first_step(_ScaledEmbeddings())
    assert calls == 3 + 3 + 1  # the check, then a forward of its own on every step
    assert torch.isfinite(gradient).all()


def test_finite_difference_trains_a_compiled_module_as_the_double_backward_trains_the_eager_one():
    # aot_eager: inductor (g++ is there) gives the same numbers, checked by hand, but compiles for a minute on CPU
    from tests.callbacks.test_kernels_and_batches import COMPILE_STYLES

    torch.manual_seed(0)
    exact, exact_value, _ = _first_step(SmallCNN(channels=1, size=8, classes=3), _cnn_data(), method="rrr")
    torch.manual_seed(0)
    compiled = COMPILE_STYLES["torch.compile(model)"](SmallCNN(channels=1, size=8, classes=3))
    estimate, value, _ = _first_step(compiled, _cnn_data(), steps=2, method="rrr", differentiation="finite_difference")
    assert value > 0  # the second step's value: the first one's gradient is compared
    assert (estimate - exact).norm() / exact.norm() < 5e-3


def test_finite_difference_runs_attention_on_the_fused_kernels(monkeypatch):
    from lightning_xai.functional import penalties
    from tests.callbacks.test_kernels_and_batches import AttentionClassifierBody

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, 8, generator=g), torch.randint(0, 2, (8,), generator=g)
    mask = torch.zeros(8, 5, 8)
    mask[:, 1] = 1
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    exact, exact_value, _ = _first_step(bind(AttentionClassifierBody)(), data, method="rrr")

    def refuse():
        raise AssertionError("the math attention kernel was forced")

    monkeypatch.setattr(penalties, "math_attention", refuse)  # every forward that forces it goes through it
    estimate, value, _ = _first_step(
        bind(AttentionClassifierBody)(), data, method="rrr", differentiation="finite_difference"
    )
    assert value == pytest.approx(exact_value, rel=1e-4)
    assert (estimate - exact).norm() / exact.norm() < 1e-2


def test_bad_differentiation_is_refused_with_the_choices():
    with pytest.raises(XAIConfigurationError, match=r"differentiation must be one of \('double_backward', 'finite"):
        ExplanationPenalty(method="rrr", differentiation="foo")
    with pytest.raises(XAIConfigurationError, match=r"'finite_difference'.*\['rrr', 'input_x_gradient', 'expected"):
        ExplanationPenalty(method="cdep", differentiation="finite_difference")
