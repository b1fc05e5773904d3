"""Values that used to give a silently wrong number or an error from deep inside: each now gives the right number,
a warning that says what changed, or an error naming the callback, the key, the value and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_xai.attribution import contextual_decomposition
from lightning_xai.callbacks import (
    AdversarialConceptHead,
    ConceptEffect,
    ExplanationPenalty,
    FairnessMetrics,
    MutualInformationRegularizer,
)
from lightning_xai.errors import GroupValueError, LabelValueError, MaskValueError, UnsupportedLayerError
from lightning_xai.functional import cdep_penalty, expected_gradients_penalty, input_x_gradient_penalty
from lightning_xai.masks import OccupancyMaskSampler
from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch
from tests.callbacks.test_fairness_metrics import Classifier, tabular
from tests.helpers import MLP, DictDataset, bind, decoy_tabular, loader, trainer


class ConstantLogit(Classifier):
    """Every example gets the binary logit 0.3: sigmoid 0.574, a positive decision."""

    def forward(self, x):
        return torch.full((x.shape[0], 1), 0.3) + 0.0 * self.net(x)[:, :1]


def test_fairness_metrics_read_logits_as_logits_even_when_they_lie_in_0_1():
    # before: a batch of logits inside [0, 1] passed for probabilities, and the positive rate read 0.0
    data = DictDataset(**tabular(64))
    results = {}
    for outputs in ("logits", "probabilities"):
        callback = FairnessMetrics(["sex"], [2], outputs=outputs, pictures_every_n_epochs=0)
        run = trainer(callbacks=[callback])
        run.validate(ConstantLogit(), loader(data, 32), verbose=False)
        results[outputs] = run.callback_metrics["fair/cell/sex0/pos_rate"].item()
    assert results == {"logits": 1.0, "probabilities": 0.0}
    with pytest.raises(Exception, match="outputs='logits'"):  # logits of a real model are no probabilities
        trainer(callbacks=[FairnessMetrics(["sex"], [2], outputs="probabilities")]).validate(
            Classifier(), loader(data, 32), verbose=False
        )


def test_expected_gradients_never_explains_a_sample_against_itself():
    model = nn.Linear(4, 2)
    x, mask, y = torch.randn(2, 4), torch.ones(2, 4), torch.tensor([0, 1])
    # two samples: the reference of each is the other one, for any seed (a permutation could be the identity)
    for seed in range(20):
        assert expected_gradients_penalty(model, x, mask, y, generator=torch.Generator().manual_seed(seed)) > 0
    with pytest.raises(Exception, match="a batch of one has none: pass references="):
        expected_gradients_penalty(model, x[:1], mask[:1], y[:1])
    # in the callback a batch of one sample draws references from earlier samples: never a zero penalty
    penalty = ExplanationPenalty("expected_gradients", weight=1.0)
    run = trainer(max_steps=3, callbacks=[penalty], log_every_n_steps=1)
    data = decoy_tabular(3)
    run.fit(MLP(), loader(DictDataset(input=data[0], target=data[1], mask=torch.ones(3, 4)), 1))
    assert run.callback_metrics["xai/expected_gradients_step"].item() > 0
    assert penalty.reference_bank is not None and penalty.reference_bank.shape == (3, 4)


@pytest.mark.parametrize(("value", "message"), [(float("nan"), "NaN"), (1.5, "weights in"), (-0.5, "weights in")])
def test_masks_with_nan_or_weights_outside_0_1_are_refused(value, message):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, mask = torch.randn(2, 4), torch.zeros(2, 4)
    mask[0, 1] = value
    with pytest.raises(MaskValueError, match=message):  # before: NaN in, NaN out, relevant + irrelevant != output
        contextual_decomposition(model, x, mask)
    with pytest.raises(MaskValueError, match=message):
        input_x_gradient_penalty(model, x, mask, torch.tensor([0, 1]))


def test_partly_nan_annotation_rows_are_an_error_and_all_nan_rows_mean_no_annotation():
    x, y, _ = decoy_tabular(4)
    mask = torch.zeros(4, 4)
    mask[1] = float("nan")  # no annotation: skipped
    run = trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr")])
    run.fit(MLP(), loader(DictDataset(input=x, target=y, mask=mask), 4))
    mask[2, 0] = float("nan")  # half a row: a data error
    with pytest.raises(MaskValueError, match=r"samples \[2\] hold NaN in some features only"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr")]).fit(
            MLP(), loader(DictDataset(input=x, target=y, mask=mask), 4)
        )


class TargetFreeLoss(CompositionCNNBody):
    """A task loss that does not read the target, so that a bad target reaches the callbacks first."""

    def training_step(self, batch, batch_idx):
        return self(batch["input"]).pow(2).mean()


def _cnn_fit(callback, **data_changes):
    data = cnn_batch(8)
    data.tensors.update(data_changes)
    trainer(max_steps=1, callbacks=[callback]).fit(bind(TargetFreeLoss)(), loader(data, 8))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0.0, 0.7] * 4), "integer classes, but one is 0.7"),  # before: truncated to class 0
        (torch.tensor([0, 2] * 4), r"classes in \[0, 1\] \(or -100 for no label\), but one is 2"),  # IndexError
        (torch.tensor([0, -1] * 4), "but one is -1"),
    ],
)
def test_concept_labels_must_be_classes_of_the_head(labels, message):
    with pytest.raises(LabelValueError, match=rf"batch\['gender'\].*{message}"):
        _cnn_fit(AdversarialConceptHead("features", "gender", 2), gender=labels)
    if int(labels.max()) < 2:  # ConceptEffect takes any number of classes, but integers >= 0
        with pytest.raises(LabelValueError, match="integer classes|but one is"):
            run = trainer(callbacks=[ConceptEffect("features", "gender")])
            data = cnn_batch(8)
            data.tensors["gender"] = labels
            run.validate(bind(CompositionCNNBody)(), loader(data, 8), verbose=False)


def test_targets_outside_the_model_classes_name_the_range():
    model = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(LabelValueError, match=r"target classes must be classes in \[0, 2\], but one is 3"):
        input_x_gradient_penalty(model, x, torch.ones(2, 4), torch.tensor([0, 3]))
    with pytest.raises(LabelValueError, match="target classes"):
        cdep_penalty(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1, 5]), variant="text")
    with pytest.raises(LabelValueError, match=r"MutualInformationRegularizer.*conditional_on_target"):
        _cnn_fit(MutualInformationRegularizer(["sex"], [2], conditional_on_target=True), target=torch.full((8,), 7))


def test_an_attribute_value_out_of_range_names_the_attribute():
    data = tabular(32)
    data["race"] = data["race"] + 1  # 3 is not among the 3 values 0..2
    with pytest.raises(GroupValueError, match="'race' has the value 3"):  # before: 'attribute 1'
        trainer(callbacks=[FairnessMetrics(["sex", "race"], [2, 3])]).validate(
            Classifier(), loader(DictDataset(**data), 32), verbose=False
        )


def test_changed_statistics_layout_and_occupancy_on_resume_are_said_not_swallowed(tmp_path):
    regularizer = MutualInformationRegularizer(["sex"], [2], momentum=0.9)
    run = trainer(max_steps=2, callbacks=[regularizer])
    run.fit(bind(CompositionCNNBody)(), loader(cnn_batch(16), 8))
    resumed = MutualInformationRegularizer(["sex"], [3], momentum=0.9)  # a third value now
    with pytest.warns(UserWarning, match=r"'num_values': \[2\].*dropped"):
        resumed.load_state_dict(regularizer.state_dict())
    assert resumed.running_sums is None
    kept = MutualInformationRegularizer(["sex"], [2], momentum=0.9)
    kept.load_state_dict(regularizer.state_dict())
    torch.testing.assert_close(kept.running_sums, regularizer.running_sums)

    sampler = OccupancyMaskSampler(occupancy=torch.ones(4, 4), seed=0)
    sampler.sample(torch.ones(2, 1, 4, 4))
    other = OccupancyMaskSampler(occupancy=torch.eye(4), seed=0)
    with pytest.warns(UserWarning, match="the given occupancy is kept"):
        other.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(other.occupancy, torch.eye(4))
    torch.testing.assert_close(other.random.get_state(), sampler.random.get_state())  # the draws continue


class BranchOnTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.lstm, self.head = nn.Embedding(10, 4), nn.LSTM(4, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, ids):
        out = self.lstm(self.embedding(ids))
        if isinstance(out, tuple):  # fx sees a Proxy here, not a tuple
            out = out[0]
        return self.head(out[:, -1])


class BufferIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.arange(4.0)[None])
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x + self.offset.expand(x.size(0), -1))


def test_decomposition_errors_name_the_cause_and_a_buffer_expanded_to_the_batch_traces():
    with pytest.raises(UnsupportedLayerError, match=r"isinstance\(output, tuple\).*unpack it unconditionally") as err:
        contextual_decomposition(BranchOnTuple(), torch.randint(0, 10, (2, 5)), torch.ones(2, 5))
    assert "tlparse" not in str(err.value)
    model, x = BufferIndex(), torch.randn(3, 4)
    relevant, irrelevant = contextual_decomposition(model, x, torch.ones(3, 4))  # before: "control flow"
    torch.testing.assert_close(relevant + irrelevant, model(x))


def test_a_callback_listed_twice_is_refused_and_no_hook_outlives_a_stage():
    effect = ConceptEffect("features", "gender")
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(callbacks=[effect, effect])
    model = bind(CompositionCNNBody)()
    trainer(callbacks=[effect]).validate(model, loader(cnn_batch(16), 8), verbose=False)
    assert not any(m._forward_hooks for m in model.modules())


class NaNLoss(MLP):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_a_nan_task_loss_is_reported_as_the_users_not_as_a_term():
    x, y, mask = decoy_tabular(8)
    with pytest.warns(UserWarning, match=r"rank 0: NaNLoss.training_step returned a non-finite loss.*task loss"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr")]).fit(
            NaNLoss(), loader(DictDataset(input=x, target=y, mask=mask), 8)
        )
