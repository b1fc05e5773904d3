"""One table over every public callback: unique state keys, checkpoint round trips, every trainer stage, both
Lightning packages, the sanity check and test-stage keys and pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_xai.callbacks import (
    AdversarialConceptHead,
    AttributionMetrics,
    ConceptEffect,
    ControlConceptHead,
    ExplanationPenalty,
    FairnessConstraint,
    FairnessMetrics,
    GenerationAttributionReport,
    LossTerm,
    MutualInformationRegularizer,
    NeuronMonitor,
    RRClArCPenalty,
    SpatialBiasMonitor,
)
from lightning_xai.datasets import PlantedAssociation, word_tokenizer
from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch
from tests.helpers import CausalLMBody, DictDataset, bind, loader, tiny_gpt2, trainer


class StagesCNNBody(CompositionCNNBody):
    def predict_step(self, batch, batch_idx):
        return self(batch["input"])


# name -> (factory taking a name, log prefix of a metric callback or None for a loss term)
CALLBACKS = {
    "ExplanationPenalty": (lambda name=None: ExplanationPenalty("cdep", name=name), None),
    "MutualInformationRegularizer": (lambda name=None: MutualInformationRegularizer(["sex"], [2], name=name), None),
    "FairnessConstraint": (
        lambda name=None: FairnessConstraint(["sex"], [2], max_dp_difference=0.0, name=name),
        None,
    ),
    "AdversarialConceptHead": (lambda name=None: AdversarialConceptHead("features", "gender", 2, name=name), None),
    "ControlConceptHead": (lambda name=None: ControlConceptHead("features", "control", 2, name=name), None),
    "AttributionMetrics": (
        lambda name=None: AttributionMetrics("saliency", num_samples=8, batch_size=8, name=name),
        "attr/saliency",
    ),
    "FairnessMetrics": (lambda name=None: FairnessMetrics(["sex"], [2], name=name), "fair"),
    "ConceptEffect": (lambda name=None: ConceptEffect("features", "gender", name=name), "concept/gender"),
    "RRClArCPenalty": (lambda name=None: RRClArCPenalty(layer="features", weight=2.0, name=name), None),
    "SpatialBiasMonitor": (lambda name=None: SpatialBiasMonitor(num_samples=8, batch_size=4, name=name), "spatial"),
    "NeuronMonitor": (
        lambda name=None: NeuronMonitor(["features.3"], feature_key="target", num_features=3, num_samples=8, name=name),
        "neurons",
    ),
    "GenerationAttributionReport": (
        lambda name=None: GenerationAttributionReport(["today alice works as a"], max_new_tokens=2, name=name),
        "llm",
    ),
}
METRIC_CALLBACKS = sorted(name for name, (_, prefix) in CALLBACKS.items() if prefix is not None)


class StagesCausalLMBody(CausalLMBody):
    def predict_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"]).logits


def _model(package, name=""):
    if name == "GenerationAttributionReport":  # it explains a causal LM: a tiny GPT-2 in the module
        tokenizer = word_tokenizer(PlantedAssociation.vocabulary())
        return bind(StagesCausalLMBody, package)(tiny_gpt2(tokenizer).train(), tokenizer)
    return bind(StagesCNNBody, package)()


def _data(name=""):
    if name == "GenerationAttributionReport":
        ids = PlantedAssociation(num_sentences=16).input_ids
        return loader(DictDataset(input_ids=ids, labels=ids), 8)
    return loader(cnn_batch(16), 8)


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_state_keys_are_unique_per_name_and_two_names_coexist(name, lightning_package):
    make, _ = CALLBACKS[name]
    first, second = make(), make(name="second")
    assert first.state_key != second.state_key and type(first).__name__ in first.state_key
    run = trainer(lightning_package, max_epochs=1, callbacks=[first, second], limit_val_batches=1)
    run.fit(_model(lightning_package, name), _data(name), _data(name))
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(lightning_package, callbacks=[make(), make()])


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_checkpoint_round_trip_restores_the_state_and_loads_with_weights_only(name, lightning_package, tmp_path):
    make, _ = CALLBACKS[name]
    callback = make()
    run = trainer(lightning_package, max_epochs=2, callbacks=[callback])
    model = _model(lightning_package, name)
    run.fit(model, _data(name), _data(name))
    path = tmp_path / "last.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain data: loadable without unpickling code
    assert _equal(checkpoint["callbacks"][callback.state_key], callback.state_dict())
    restored = make()
    resumed = trainer(lightning_package, max_epochs=2, callbacks=[restored])
    resumed.fit(
        _model(lightning_package, name), _data(name), _data(name), ckpt_path=path
    )  # nothing left to train: restore only
    assert _equal(restored.state_dict(), callback.state_dict())
    if isinstance(callback, LossTerm):
        assert restored.steps_seen == 4
    else:
        assert restored.epochs_computed == 2 and restored.last_values


@pytest.mark.parametrize("name", METRIC_CALLBACKS)
def test_metric_callbacks_skip_the_sanity_check(name, lightning_package):
    make, prefix = CALLBACKS[name]
    callback = make()
    run = trainer(lightning_package, max_epochs=1, callbacks=[callback], num_sanity_val_steps=2)
    run.fit(_model(lightning_package, name), _data(name), _data(name))
    assert callback.epochs_computed == 1


@pytest.mark.parametrize("name", METRIC_CALLBACKS)
def test_test_stage_logs_under_test_keys_with_pictures(name, lightning_package, tmp_path):
    make, prefix = CALLBACKS[name]
    callback = make()
    logger = lightning_package.loggers.CSVLogger(tmp_path, name="run", version="")
    run = trainer(lightning_package, callbacks=[callback], logger=logger)
    run.test(_model(lightning_package, name), _data(name), verbose=False)
    keys = set(run.callback_metrics)
    assert {key for key in keys if key.startswith(f"test/{prefix}/")}, keys
    assert not {key for key in keys if key.startswith(f"{prefix}/")}, keys  # validation keys stay apart
    assert callback.epochs_computed == 0  # test computations do not advance the fit's cadence
    pictures = (
        sorted(p.name for p in Path(logger.log_dir, "media").glob("test_*/*.png")) if name != "ConceptEffect" else []
    )
    if name != "ConceptEffect":  # ConceptEffect logs numbers only
        assert pictures and all(p.startswith("test_step_") for p in pictures), pictures


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_every_stage_runs_with_every_callback(name, lightning_package):
    make, prefix = CALLBACKS[name]
    callback = make()
    model = _model(lightning_package, name)
    run = trainer(lightning_package, max_epochs=1, callbacks=[callback])
    run.fit(model, _data(name), _data(name))
    for stage in ("validate", "test"):
        metrics = getattr(run, stage)(model, _data(name), verbose=False)[0]
        if prefix is None:  # a loss term acts in training only
            assert not any(key.startswith("xai/") for key in metrics)
        else:
            assert any(key.startswith(("test/" if stage == "test" else "") + prefix) for key in metrics)
    predictions = run.predict(model, _data(name))
    assert len(predictions) == 2 and predictions[0].shape[0] == 8


def test_the_old_picture_and_prefix_arguments_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"log_images= is deprecated; use pictures_every_n_epochs=0"):
        assert AttributionMetrics(log_images=False).pictures_every_n_epochs == 0
    with pytest.warns(DeprecationWarning, match=r"images_every_n_epochs= is deprecated"):
        assert AttributionMetrics(images_every_n_epochs=3).pictures_every_n_epochs == 3
    with pytest.warns(DeprecationWarning, match=r"plot_every_n_epochs= is deprecated"):
        assert FairnessMetrics(["sex"], [2], plot_every_n_epochs=4).pictures_every_n_epochs == 4
    with pytest.warns(DeprecationWarning, match=r"prefix= is deprecated; use name="):
        callback = FairnessMetrics(["sex"], [2], prefix="fairness")
    assert callback.name == "fairness" and callback.key("dp_diff", "test") == "test/fairness/dp_diff"
