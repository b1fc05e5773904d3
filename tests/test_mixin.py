"""XAIMixin: the batch and output contracts, the wrapped training_step, manual optimization and the progress bar."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai._contract import logits_of, parse_batch
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.errors import XAIConfigurationError
from tests.callbacks.test_composition import CNN_TERMS, CompositionCNNBody, cnn_batch, seed_heads
from tests.helpers import MLP, DictDataset, MLPBody, bind, decoy_tabular, loader, trainer

X, Y, MASK = torch.zeros(3, 4), torch.tensor([0, 1, 0]), torch.ones(3, 4)

BATCHES = {
    "tuple": ((X, Y), {"input": X, "target": Y}),
    "tuple with extras": ((X, Y, {"mask": MASK}), {"input": X, "target": Y, "mask": MASK}),
    "dict": ({"input": X, "target": Y}, {"input": X, "target": Y}),
    "dict with aliases": ({"x": X, "labels": Y}, {"x": X, "labels": Y, "input": X, "target": Y}),
    "hugging face": ({"input_ids": X, "labels": Y}, {"input_ids": X, "labels": Y, "input": X, "target": Y}),
    "bare tensor": (X, {"input": X}),
}


@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_xai_batch_maps_every_supported_layout(kind):
    batch, expected = BATCHES[kind]
    data = MLP().xai_batch(batch)
    assert data.keys() == expected.keys()
    assert all(data[key] is value for key, value in expected.items())
    assert parse_batch(batch).keys() == expected.keys()  # the one parser behind it


def test_xai_batch_keys_and_layout_errors():
    class Keyed(MLP):
        xai_input_key, xai_target_key = "pixels", "y_true"

    data = Keyed().xai_batch({"pixels": X, "y_true": Y, "x": MASK})
    assert data["input"] is X and data["target"] is Y  # the configured keys win over the aliases
    with pytest.raises(XAIConfigurationError, match="third element of a tuple batch must be a dict"):
        MLP().xai_batch((X, Y, MASK))
    with pytest.raises(XAIConfigurationError, match="override xai_batch"):
        MLP().xai_batch("text")


OUTPUTS = {
    "tensor": lambda logits: logits,
    "dict": lambda logits: {"logits": logits, "features": logits.detach()},
    "tuple": lambda logits: (logits, "cache"),
    "model output": lambda logits: __import__("transformers").modeling_outputs.SequenceClassifierOutput(logits=logits),
}


class OutputMLPBody(XAIMixin):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        self.wrap = wrap

    def forward(self, x):
        return OUTPUTS[self.wrap](self.net(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(logits_of(self(batch["input"])), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("wrap", sorted(OUTPUTS))
@pytest.mark.parametrize("method", ["cdep", "rrr", "input_x_gradient", "expected_gradients"])
def test_every_penalty_reads_logits_from_dicts_tuples_and_model_outputs(method, wrap):
    x, y, mask = decoy_tabular(8)
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    results = {}
    for kind in ("tensor", wrap):
        model = bind(OutputMLPBody)(kind)
        run = trainer(max_steps=1, callbacks=[ExplanationPenalty(method=method, weight=2.0)])
        run.fit(model, data)
        results[kind] = (run.callback_metrics[f"xai/{method}_step"].item(), list(model.parameters()))
    assert results[wrap][0] == pytest.approx(results["tensor"][0], rel=1e-5)
    for a, b in zip(results[wrap][1], results["tensor"][1]):
        torch.testing.assert_close(a, b)


def test_logits_key_and_missing_logits_are_named():
    class Scores(bind(OutputMLPBody)):
        xai_logits_key = "scores"

        def forward(self, x):
            return {"scores": self.net(x)}

    model = Scores("tensor")
    assert model.xai_forward(X).shape == (3, 2)
    model.xai_logits_key = "logits"
    with pytest.raises(XAIConfigurationError, match=r"xai_logits_key.*xai_forward"):
        model.xai_forward(X)


def test_a_super_chain_of_training_steps_adds_the_terms_once():
    class Child(MLP):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    x, y, mask = decoy_tabular(8)
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    outputs = {}
    for cls in (MLP, Child):
        torch.manual_seed(0)
        model = cls(optimizer="sgd")
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", weight=5.0)]).fit(model, data)
        outputs[cls] = list(model.parameters())
    for a, b in zip(outputs[MLP], outputs[Child]):
        torch.testing.assert_close(a, b)


class TwoOptimizersBody(CompositionCNNBody):
    """Manual optimization: one optimizer for the features (and the concept heads), one for the head."""

    def __init__(self, rounds: int = 1):
        super().__init__()
        self.automatic_optimization = False
        self.rounds = rounds

    def training_step(self, batch, batch_idx):
        features, head = self.optimizers()
        for _ in range(self.rounds):  # each round: its own forward, its own terms, its own backward
            loss = F.cross_entropy(self(batch["input"]), batch["target"]) + self.xai_loss(batch)
            features.zero_grad()
            head.zero_grad()
            self.manual_backward(loss)
            features.step()
            head.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.features.parameters(), lr=0.5), torch.optim.SGD(self.head.parameters(), lr=0.5)


def _fit(model, term, package, steps=1):
    callbacks = seed_heads(model, [CNN_TERMS[term]()])
    trainer(package, max_steps=steps, callbacks=callbacks).fit(model, loader(cnn_batch(), 8))
    return callbacks[0], {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("term", sorted(CNN_TERMS))
def test_every_loss_term_works_under_manual_optimization_with_two_optimizers(term, lightning_package):
    # two SGD optimizers over a partition of the parameters take the automatic single-optimizer step exactly
    _, automatic = _fit(bind(CompositionCNNBody, lightning_package)(), term, lightning_package)
    callback, manual = _fit(bind(TwoOptimizersBody, lightning_package)(), term, lightning_package)
    assert callback.steps_seen == 1
    assert manual.keys() == automatic.keys()
    for name, value in automatic.items():
        torch.testing.assert_close(manual[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("term", ["cdep", "rrr", "mutual_information", "adversary"])
def test_two_rounds_in_one_manual_step_each_read_their_own_forward(term):
    # a second xai_loss in one step must not differentiate the first round's (freed) graph. With one batch per
    # epoch, two rounds in one step make the same updates as one round in each of two steps (manual optimization
    # counts every optimizer.step() as a global step: 2 optimizers x 2 rounds = 4)
    one_round, two_steps = _fit(bind(TwoOptimizersBody)(rounds=1), term, pl, steps=4)
    two_rounds, one_step = _fit(bind(TwoOptimizersBody)(rounds=2), term, pl, steps=4)
    assert one_round.steps_seen == two_rounds.steps_seen == 2
    for name, value in two_steps.items():
        torch.testing.assert_close(one_step[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_xai_loss_with_another_batch_object_is_refused():
    class Other(TwoOptimizersBody):
        def training_step(self, batch, batch_idx):
            self(batch["input"])
            self.xai_loss(dict(batch))

    with pytest.raises(XAIConfigurationError, match="the batch training_step received"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr")]).fit(bind(Other)(), loader(cnn_batch(), 8))


def test_total_and_chosen_terms_are_on_the_progress_bar(lightning_package):
    x, y, mask = decoy_tabular(8)
    data = loader(DictDataset(input=x, target=y, mask=mask), 8)
    callbacks = [ExplanationPenalty("rrr", prog_bar=True), ExplanationPenalty("cdep", name="cdep")]
    run = trainer(lightning_package, max_steps=1, callbacks=callbacks)
    run.fit(bind(MLPBody, lightning_package)(), data)
    shown = set(run.progress_bar_metrics)
    assert {"xai/total_step", "xai/rrr_step"} <= shown and not any(key.startswith("xai/cdep") for key in shown)

    class Quiet(MLP):
        xai_prog_bar = False

    run = trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr")])
    run.fit(Quiet(), data)
    assert not any(key.startswith("xai/") for key in run.progress_bar_metrics)
    assert "xai/total_step" in run.callback_metrics


@pytest.mark.parametrize("wrap", sorted(OUTPUTS))
def test_attribution_metrics_read_logits_from_every_output_kind(wrap):
    from lightning_xai.callbacks import AttributionMetrics

    x, y, mask = decoy_tabular(16)
    data = DictDataset(input=x, target=y, mask=mask)
    values = {}
    for kind in ("tensor", wrap):
        callback = AttributionMetrics(
            "saliency", metrics=["comprehensiveness", "region_attribution_mass"], dataset=data
        )
        trainer(max_epochs=1, callbacks=[callback]).fit(bind(OutputMLPBody)(kind), loader(data, 8))
        values[kind] = callback.last_values
    assert values[wrap] == pytest.approx(values["tensor"]) and len(values[wrap]) == 2
