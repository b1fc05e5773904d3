"""NeuronMonitor: planted neurons give known values through a real fit, training moves a text CNN's neurons, the
reference survives resume, DDP equals one process, every stage logs, ModelPruning and inline pruning prune the
lowest-scored neurons, LSTM / BERT / image CNN layers are read, and bad configurations fail early and clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import NeuronMonitor
from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError
from lightning_xai.functional.neurons import lowest_scored
from tests.helpers import (
    DictDataset,
    LSTMTextClassifierBody,
    SmallCNNBody,
    assert_ddp_matches_single,
    bind,
    loader,
    token_decoy_data,
    trainer,
)

VOCAB = 8


class Steps:
    """Cross-entropy in every stage, on any batch the mixin reads."""

    def training_step(self, batch, batch_idx):
        data = self.xai_batch(batch)
        return F.cross_entropy(self(data["input"]), data["target"])

    def validation_step(self, batch, batch_idx):
        data = self.xai_batch(batch)
        self.log("val_loss", F.cross_entropy(self(data["input"]), data["target"]))

    def test_step(self, batch, batch_idx):
        data = self.xai_batch(batch)
        self.log("test_loss", F.cross_entropy(self(data["input"]), data["target"]))


class PlantedBody(Steps, XAIMixin):
    """Neuron i of ``probe`` fires (with activation i + 1) on token i only; only the head trains."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, VOCAB)
        self.embedding.weight.data = torch.diag(torch.arange(1.0, VOCAB + 1))
        self.probe = nn.Linear(VOCAB, VOCAB, bias=False)
        self.probe.weight.data = torch.eye(VOCAB)
        for parameter in (*self.embedding.parameters(), *self.probe.parameters()):
            parameter.requires_grad_(False)
        self.head = nn.Linear(VOCAB, 2)

    def forward(self, ids):
        return self.head(self.probe(self.embedding(ids)).mean(1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


class TextCNNBody(Steps, XAIMixin):
    def __init__(self, lr: float = 0.5, vocab: int = 40):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(vocab, 16)
        self.conv = nn.Conv1d(16, 12, 3, padding=1)
        self.head = nn.Linear(12, 2)
        self.lr = lr

    def forward(self, ids):
        hidden = F.relu(self.conv(self.embedding(ids).transpose(1, 2)))
        return self.head(hidden.amax(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _planted_data(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 6), generator=generator)
    ids[::2, -2:] = 0  # padding
    return DictDataset(input=ids, target=torch.randint(0, 2, (n,), generator=generator))


def _decoy_data(n=64, seed=0):
    ids, labels, _ = token_decoy_data(n, length=8, seed=seed)
    return DictDataset(input=ids, target=labels)


def test_planted_neurons_through_fit_give_exact_values():
    data = _planted_data()
    monitor = NeuronMonitor(["probe"], ignore_index=0, num_samples=16, pictures_every_n_epochs=0)
    run = trainer(max_epochs=2, callbacks=[monitor])
    run.fit(bind(PlantedBody)(), loader(data, 4), loader(data, 8))
    values = {k: v.item() for k, v in run.callback_metrics.items() if k.startswith("neurons/")}
    # token 0 (padding) is ignored, so neuron 0 is dead; every other neuron has exactly one feature, its token
    assert values["neurons/probe/dead_share"] == pytest.approx(1 / VOCAB)
    assert values["neurons/probe/mean_length"] == 1.0
    assert values["neurons/probe/redundancy"] == 0.0
    for key in ("hellinger_previous", "hellinger_reference", "length_shift"):
        assert values[f"neurons/probe/{key}"] == 0.0
    mass = monitor.counts["validate"]["probe"].mass
    tokens = data.tensors["input"] if hasattr(data, "tensors") else torch.stack([data[i]["input"] for i in range(16)])
    expected = torch.diag(torch.stack([(tokens == i).sum() * (i + 1.0) for i in range(VOCAB)]))
    expected[0, 0] = 0
    torch.testing.assert_close(mass, expected)


def test_training_moves_a_text_cnns_neurons_and_a_frozen_one_stays():
    data = _decoy_data()
    moved = {}
    for lr in (0.0, 0.5):
        monitor = NeuronMonitor(["conv"], num_samples=64, mode="topk", k=2, pictures_every_n_epochs=0)
        run = trainer(max_epochs=3, callbacks=[monitor])
        run.fit(bind(TextCNNBody)(lr=lr), loader(data, 16), loader(data, 32))
        moved[lr] = {k.split("/")[-1]: v.item() for k, v in run.callback_metrics.items() if k.startswith("neurons/")}
    assert moved[0.0]["hellinger_reference"] == 0.0 and moved[0.0]["hellinger_previous"] == 0.0
    assert moved[0.5]["hellinger_reference"] > 0.1
    assert 0 < moved[0.5]["hellinger_previous"] < moved[0.5]["hellinger_reference"] + 1e-6


def test_the_reference_survives_resume_and_is_not_remeasured(tmp_path: Path):
    data = _decoy_data()
    first = NeuronMonitor(["conv"], num_samples=64, pictures_every_n_epochs=0)
    run = trainer(max_epochs=2, callbacks=[first])
    model = bind(TextCNNBody)()
    run.fit(model, loader(data, 16), loader(data, 32))
    checkpoint = tmp_path / "epoch2.ckpt"
    run.save_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert any(key.startswith("NeuronMonitor") for key in state["callbacks"])
    resumed = NeuronMonitor(["conv"], num_samples=64, pictures_every_n_epochs=0)
    run = trainer(max_epochs=3, callbacks=[resumed])
    run.fit(bind(TextCNNBody)(), loader(data, 16), loader(data, 32), ckpt_path=checkpoint)
    torch.testing.assert_close(resumed._reference["conv"], first._reference["conv"])
    # measured afresh at the resumed weights, the reference would be the trained distribution: distance ~ 0
    assert run.callback_metrics["neurons/conv/hellinger_reference"].item() > 0.05


def test_a_checkpoint_path_reference_is_loaded_with_its_weights(tmp_path: Path):
    data = _decoy_data()
    untrained = bind(TextCNNBody)()
    path = tmp_path / "start.ckpt"
    torch.save({"state_dict": untrained.state_dict()}, path)
    monitor = NeuronMonitor(["conv"], num_samples=64, reference=str(path), pictures_every_n_epochs=0)
    run = trainer(max_epochs=1, callbacks=[monitor])
    run.validate(untrained, loader(data, 32))
    assert run.callback_metrics["neurons/conv/hellinger_reference"].item() == 0.0


@pytest.mark.ddp
def test_ddp_equals_one_process():
    assert_ddp_matches_single(
        lambda: bind(TextCNNBody)(),
        lambda: [NeuronMonitor(["conv"], num_samples=32, pictures_every_n_epochs=0)],
        _decoy_data(32),
        batch_size=16,
        stage="validate",
        prefixes=("neurons/",),
        parameters=False,
    )
    assert_ddp_matches_single(
        lambda: bind(TextCNNBody)(),
        lambda: [
            NeuronMonitor(["conv"], num_samples=32, dataset=_decoy_data(32), batch_size=8, pictures_every_n_epochs=0)
        ],
        _decoy_data(32),
        batch_size=16,
        prefixes=("neurons/",),
        max_epochs=2,
    )


def test_validate_and_test_stages_log_their_keys(lightning_package):
    data = _decoy_data(32)
    monitor = NeuronMonitor(["conv"], num_samples=32, pictures_every_n_epochs=0)
    run = trainer(lightning_package, callbacks=[monitor])
    model = bind(TextCNNBody, lightning_package)()
    run.validate(model, loader(data, 16))
    assert {k for k in run.callback_metrics if k.startswith("neurons/")} == {
        "neurons/conv/dead_share",
        "neurons/conv/mean_length",
        "neurons/conv/redundancy",
    }
    run.test(model, loader(data, 16))
    assert {k for k in run.callback_metrics if "neurons" in k} == {
        "test/neurons/conv/dead_share",
        "test/neurons/conv/mean_length",
        "test/neurons/conv/redundancy",
    }


def test_model_pruning_removes_the_lowest_scored_filters(lightning_package):
    callbacks = pytest.importorskip(f"{lightning_package.__name__}.callbacks")
    data = _decoy_data()
    model = bind(TextCNNBody, lightning_package)()
    monitor = NeuronMonitor(["conv"], num_samples=64, pictures_every_n_epochs=0)
    parameters = [(model.conv, "weight")]
    pruning = callbacks.ModelPruning(
        monitor.pruning_method(parameters, score="mass"),
        parameters_to_prune=parameters,
        amount=0.25,
        use_lottery_ticket_hypothesis=False,
        make_pruning_permanent=False,
    )
    scores = []

    class Scores(lightning_package.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            scores.append(monitor.scores("conv", "mass"))

    run = trainer(lightning_package, max_epochs=1, callbacks=[monitor, Scores(), pruning])
    run.fit(model, loader(data, 16), loader(data, 32))
    pruned_rows = (model.conv.weight_mask.flatten(1) == 0).all(1).nonzero().flatten()
    assert pruned_rows.tolist() == lowest_scored(scores[0], 0.25).tolist()
    assert len(pruned_rows) == 3 and (model.conv.weight[pruned_rows] == 0).all()


def test_inline_pruning_zeroes_the_lowest_scored_channels_and_can_be_undone():
    data = _decoy_data()
    model = bind(TextCNNBody)()
    monitor = NeuronMonitor(["conv"], num_samples=64, pictures_every_n_epochs=0)
    trainer(max_epochs=1, callbacks=[monitor]).fit(model, loader(data, 16), loader(data, 32))
    ids = data[0]["input"][None]
    pruned = monitor.prune("conv", 0.5, score="transfer")
    assert pruned.tolist() == lowest_scored(monitor.scores("conv", "transfer"), 0.5).tolist()
    output = model.conv(model.embedding(ids).transpose(1, 2))
    assert (output[:, pruned] == 0).all() and (output.abs().sum((0, 2)) > 0).sum() == 6
    monitor.prune("conv", 0)
    assert (model.conv(model.embedding(ids).transpose(1, 2))[:, pruned] != 0).any()


class BertBody(Steps, XAIMixin):
    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        from tests.helpers import tiny_bert_config

        torch.manual_seed(0)
        self.bert = transformers.BertForSequenceClassification(tiny_bert_config(vocab_size=40))

    def forward(self, ids):
        return self.bert(input_ids=ids).logits

    def xai_embed(self, input_ids):
        return self.bert.bert.embeddings.word_embeddings(input_ids)

    def xai_forward_from_embeddings(self, embeddings, batch):
        return self.bert(inputs_embeds=embeddings, attention_mask=batch.get("attention_mask")).logits

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lstm_bert_and_image_cnn_layers_are_monitored():
    ids, labels, _ = token_decoy_data(16, length=8)
    text = DictDataset(input_ids=ids, labels=labels, attention_mask=(ids > 5).long())
    lstm = NeuronMonitor(["lstm"], num_samples=16, pictures_every_n_epochs=0)
    run = trainer(callbacks=[lstm])
    run.validate(bind(type("LSTMBody", (Steps, LSTMTextClassifierBody), {}))(), loader(text, 8))
    assert lstm.counts["validate"]["lstm"].mass.shape == (16, 40)
    bert = NeuronMonitor(["bert.bert.encoder.layer.0"], valid_key="attention_mask", num_samples=16)
    model = bind(BertBody)()
    trainer(callbacks=[bert]).validate(model, loader(text, 8))
    counts = bert.counts["validate"]["bert.bert.encoder.layer.0"].count
    assert (
        counts.shape == (model.bert.config.hidden_size, 40) and counts.sum() == (ids > 5).sum()
    )  # masked positions credit nothing
    images = DictDataset(input=torch.rand(16, 1, 12, 12), target=torch.arange(16) % 10)
    classes = NeuronMonitor(["features.3"], feature_key="target", num_features=10, num_samples=16)
    trainer(callbacks=[classes]).validate(bind(type("CNNBody", (Steps, SmallCNNBody), {}))(), loader(images, 8))
    assert classes.counts["validate"]["features.3"].mass.shape == (16, 10)


def test_pictures_are_a_table_and_a_histogram(tmp_path: Path):
    data = _decoy_data()
    names = [f"w{i}" for i in range(40)]
    monitor = NeuronMonitor(["conv"], num_samples=64, feature_names=names, pictures_every_n_epochs=1)
    logger = pl.loggers.CSVLogger(tmp_path)
    run = trainer(max_epochs=2, callbacks=[monitor], logger=logger)
    run.fit(bind(TextCNNBody)(), loader(data, 16), loader(data, 32))
    tables = sorted((Path(logger.log_dir) / "media" / "neurons_conv_top_features").glob("*.csv"))
    images = sorted((Path(logger.log_dir) / "media" / "neurons_hellinger").glob("*.png"))
    assert tables and images
    text = tables[-1].read_text()
    assert "hellinger to reference" in text and "w" in text.splitlines()[1]


def test_configuration_errors_name_the_fix():
    data = _decoy_data(16)
    with pytest.raises(XAIConfigurationError, match="no submodule 'convv'"):
        trainer(callbacks=[NeuronMonitor(["convv"])]).validate(bind(TextCNNBody)(), loader(data, 8))
    with pytest.raises(XAIConfigurationError, match="num_features="):
        trainer(callbacks=[NeuronMonitor(["conv"], feature_key="target")]).validate(
            bind(TextCNNBody)(), loader(data, 8)
        )
    with pytest.raises(MissingBatchKeyError, match="'pos_tags'"):
        monitor = NeuronMonitor(["conv"], feature_key="pos_tags", num_features=5)
        trainer(callbacks=[monitor]).validate(bind(TextCNNBody)(), loader(data, 8))
    with pytest.raises(XAIConfigurationError, match="unknown mode"):
        NeuronMonitor(["conv"], mode="max2")  # type: ignore[arg-type]


def test_composes_with_a_loss_term_and_bf16_mixed_precision():
    from lightning_xai.callbacks import ExplanationPenalty
    from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch

    data = cnn_batch(16)
    monitor = NeuronMonitor(["features.3"], feature_key="target", num_features=3, num_samples=16)
    penalty = ExplanationPenalty("rrr", weight=1.0)
    run = trainer(max_epochs=2, callbacks=[penalty, monitor], precision="bf16-mixed", log_every_n_steps=1)
    run.fit(bind(CompositionCNNBody)(), loader(data, 8), loader(data, 8))
    metrics = run.callback_metrics
    assert "xai/rrr" in metrics and torch.isfinite(metrics["xai/rrr"])
    assert 0.0 <= metrics["neurons/features.3/hellinger_reference"].item() <= 1.0
    assert metrics["neurons/features.3/mean_length"].item() >= 1.0


def test_the_model_understanding_monitors_share_one_model_and_layer(lightning_package):
    """NeuronMonitor and SpatialBiasMonitor hook the same convolution beside AttributionMetrics; each logs what it
    logs alone."""
    from lightning_xai.callbacks import AttributionMetrics, SpatialBiasMonitor
    from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch

    data = cnn_batch(16)

    def run(*callbacks):
        trainer_ = trainer(lightning_package, max_epochs=2, callbacks=list(callbacks))
        trainer_.fit(bind(CompositionCNNBody, lightning_package)(), loader(data, 8), loader(data, 8))
        return {k: v.item() for k, v in trainer_.callback_metrics.items() if not k.endswith("loss")}

    def neurons():
        return NeuronMonitor(["features.3"], feature_key="target", num_features=3, num_samples=16)

    def spatial():
        return SpatialBiasMonitor(layers=["features.3"], num_samples=16, pictures_every_n_epochs=0)

    def attributions():
        return AttributionMetrics("saliency", num_samples=8, pictures_every_n_epochs=0)

    together = run(neurons(), spatial(), attributions())
    alone = {**run(neurons()), **run(spatial()), **run(attributions())}
    assert together.keys() == alone.keys()
    for key, value in alone.items():
        assert together[key] == pytest.approx(value, abs=1e-6), key
