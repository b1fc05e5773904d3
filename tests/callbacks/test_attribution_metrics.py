import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_xai import XAIMixin
from lightning_xai.attribution import attribute
from lightning_xai.callbacks import AttributionMetrics
from lightning_xai.datasets import DecoyDigits
from lightning_xai.errors import MissingBatchKeyError, MissingMixinError, XAIConfigurationError
from lightning_xai.metrics import Comprehensiveness, RegionAttributionMass
from tests.helpers import (
    DictDataset,
    LSTMTextClassifier,
    SmallCNN,
    assert_ddp_matches_single,
    loader,
    token_decoy_data,
    trainer,
)


class ValidatingCNN(SmallCNN):
    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["input"]).argmax(1) == batch["target"]).float().mean())


def _digits(n=48, split="train"):
    digits = DecoyDigits(split)
    return DictDataset(input=digits.images[:n], target=digits.targets[:n], mask=digits.masks[:n])


def _callback(**kwargs):
    options = dict(
        method="saliency",
        metrics=["comprehensiveness", "region_attribution_mass"],
        num_samples=32,
        batch_size=16,
        pictures_every_n_epochs=0,
    )
    options.update(kwargs)
    return AttributionMetrics(**options)


def test_logged_values_equal_the_metrics_on_the_probe_set():
    torch.manual_seed(0)
    callback = _callback()
    model = ValidatingCNN()
    run = trainer(max_epochs=1, callbacks=[callback])
    run.fit(model, loader(_digits(64), 32), loader(_digits(48, "val"), 16))

    probe = callback._probes["validate"]
    assert probe["input"].shape[0] == 32
    model.eval()
    attributions = attribute("saliency", model, probe["input"], probe["target"])
    comprehensiveness, mass = Comprehensiveness(), RegionAttributionMass()
    comprehensiveness.update(probe["input"], attributions, probe["target"], model=model)
    mass.update(probe["input"], attributions, probe["target"], mask=probe["mask"])
    logged = run.callback_metrics
    assert logged["attr/saliency/comprehensiveness"].item() == pytest.approx(
        comprehensiveness.compute().item(), rel=1e-4
    )
    assert logged["attr/saliency/region_attribution_mass"].item() == pytest.approx(mass.compute().item(), rel=1e-4)
    assert 0 < logged["attr/saliency/region_attribution_mass"].item() < 1


def test_works_under_validate_in_inference_mode_and_restores_modes():
    callback = _callback(metrics=["comprehensiveness", "infidelity"])
    model = ValidatingCNN()
    run = trainer(callbacks=[callback])
    run.validate(model, loader(_digits(48, "val"), 16), verbose=False)
    assert torch.isfinite(run.callback_metrics["attr/saliency/infidelity"])
    assert callback.epochs_computed == 1

    model.train()
    model.features[0].eval()
    model.log = lambda *args, **kwargs: None  # called outside a loop, where self.log has no result collection
    callback.on_validation_epoch_end(run, model)
    assert model.training and not model.features[0].training and model.head.training


def test_skips_sanity_check_and_honours_every_n_epochs():
    callback = _callback(every_n_epochs=2, metrics=["comprehensiveness"])
    run = trainer(max_epochs=3, callbacks=[callback], num_sanity_val_steps=2)
    run.fit(ValidatingCNN(), loader(_digits(32), 16), loader(_digits(32, "val"), 16))
    assert callback.epochs_computed == 1  # epoch 2 only; neither the sanity check nor epochs 1 and 3


def test_text_model_is_explained_on_embeddings_and_tokens_are_logged(tmp_path):
    class TextWithValidation(LSTMTextClassifier):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.cross_entropy(self(batch["input_ids"]), batch["labels"]))

    ids, labels, _ = token_decoy_data(32)
    data = DictDataset(input_ids=ids, labels=labels)
    callback = AttributionMetrics(
        method="integrated_gradients",
        metrics=["comprehensiveness", "infidelity"],
        num_samples=16,
        num_images=2,
        method_kwargs={"n_steps": 8},
        token_decoder=lambda row: [f"<w{i}>" for i in row],
    )
    run = trainer(max_epochs=1, callbacks=[callback], logger=CSVLogger(tmp_path, name="text"))
    model = TextWithValidation()
    run.fit(model, loader(data, 16), loader(data, 16))
    assert torch.isfinite(run.callback_metrics["attr/integrated_gradients/comprehensiveness"])
    assert callback._metrics(model)["comprehensiveness"].feature_dims == (1,)  # ERASER: whole tokens
    html_files = list(tmp_path.rglob("*.html"))
    assert html_files and "&lt;w" in html_files[0].read_text()  # user text is escaped
    assert list(tmp_path.rglob("*.png"))


def test_heatmaps_reach_the_csv_logger(tmp_path):
    callback = _callback(pictures_every_n_epochs=5, num_images=4)
    run = trainer(max_epochs=1, callbacks=[callback], logger=CSVLogger(tmp_path, name="images"))
    run.fit(ValidatingCNN(), loader(_digits(32), 16), loader(_digits(32, "val"), 16))
    pngs = list(tmp_path.rglob("*.png"))
    assert pngs and "heatmaps" in str(pngs[0])


def test_heatmaps_are_rendered_for_the_logger_and_only_when_there_is_one(tmp_path, monkeypatch):
    from lightning_xai import visualization

    rendered = []
    render = visualization.render_heatmaps

    def counting_render(*args, **kwargs):
        rendered.append(render(*args, **kwargs))
        return rendered[-1]

    monkeypatch.setattr(visualization, "render_heatmaps", counting_render)
    for logger in (False, CSVLogger(tmp_path, name="images")):
        callback = _callback(pictures_every_n_epochs=1, num_images=4)
        run = trainer(max_epochs=2, callbacks=[callback], logger=logger)
        run.fit(ValidatingCNN(), loader(_digits(32), 16), loader(_digits(32, "val"), 16))
        assert callback.epochs_computed == 2 and len(rendered) == (2 if logger else 0)
    # one 160 px column per rendered sample
    assert rendered[0].shape[1] == 4 * 160 and rendered[0].dtype == np.uint8


def test_clear_errors():
    with pytest.raises(XAIConfigurationError, match="unknown metrics"):
        AttributionMetrics(metrics=["accuracy"])
    with pytest.raises(MissingBatchKeyError, match="'forbidden'"):
        trainer(max_epochs=1, callbacks=[_callback(mask_key="forbidden")]).fit(
            ValidatingCNN(), loader(_digits(32), 16), loader(_digits(32, "val"), 16)
        )

    class Plain(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(MissingMixinError, match="XAIMixin"):
        _callback().setup(trainer(), Plain(), "fit")


@pytest.mark.ddp
def test_ddp_spawn_gives_the_single_process_value():
    # 16 validation samples, probe of 16: one process explains all of them, two ranks 8 each.
    def make_model():
        torch.manual_seed(0)
        return ValidatingCNN()

    assert_ddp_matches_single(
        make_model,
        lambda: [_callback(num_samples=16)],
        _digits(16, "val"),
        batch_size=16,
        stage="validate",
        prefixes=("attr/",),
        atol=0.0,
        rtol=1e-4,
        parameters=False,
    )


class MaskedMeanText(XAIMixin, pl.LightningModule):
    """Mean-pools embeddings under an attention mask: padded positions cannot matter."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(30, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, ids, attention_mask):
        return self.xai_forward_from_embeddings(self.embedding(ids), {"attention_mask": attention_mask})

    def xai_embed(self, input_ids):
        return self.embedding(input_ids)

    def xai_forward_from_embeddings(self, embeddings, batch):
        weights = batch["attention_mask"].unsqueeze(-1).float()
        return self.head(torch.tanh((embeddings * weights).sum(1) / weights.sum(1)))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("method", ["integrated_gradients", "split_integrated_gradients"])
def test_attention_masks_follow_captums_path_batches(method):
    from lightning_xai.callbacks.attribution_metrics import _Logits

    torch.manual_seed(0)
    model = MaskedMeanText()
    ids = torch.randint(1, 30, (4, 6))
    attention_mask = torch.ones(4, 6, dtype=torch.long)
    attention_mask[0, 3:] = 0  # samples padded differently: a row mix-up would leak attribution onto padding
    attention_mask[2, 1:] = 0
    logits = _Logits(model, {"input": ids, "attention_mask": attention_mask}, ("attention_mask",))
    attributions = attribute(
        method,
        logits,
        model.xai_embed(ids).detach(),
        torch.tensor([0, 1, 0, 1]),
        additional_forward_args=(attention_mask,),
        n_steps=8,
    )
    padded = attention_mask == 0
    assert attributions.abs().sum(-1)[padded].max() == 0
    assert attributions.abs().sum(-1)[~padded].min() > 0
    # metric kernels call without the tensors: consecutive copies of each sample get that sample's mask
    perturbed = model.xai_embed(ids).detach().repeat_interleave(3, dim=0)
    expected = model.xai_forward_from_embeddings(perturbed, {"attention_mask": attention_mask.repeat_interleave(3, 0)})
    torch.testing.assert_close(logits(perturbed), expected)


def test_text_model_with_attention_masks_runs_through_the_callback():
    ids = torch.randint(1, 30, (32, 6))
    attention_mask = (torch.arange(6).expand(32, 6) < torch.randint(2, 7, (32, 1))).long()
    data = DictDataset(input_ids=ids, attention_mask=attention_mask, labels=torch.randint(0, 2, (32,)))
    callback = AttributionMetrics(
        method="integrated_gradients",
        metrics=["comprehensiveness", "infidelity"],
        num_samples=16,
        method_kwargs={"n_steps": 8},
        pictures_every_n_epochs=0,
    )
    run = trainer(max_epochs=1, callbacks=[callback])
    run.fit(MaskedMeanText(), loader(data, 16), loader(data, 16))
    assert torch.isfinite(run.callback_metrics["attr/integrated_gradients/infidelity"])


def test_a_given_dataset_is_the_probe_and_works_without_a_validation_loop():
    callback = _callback(dataset=_digits(24, "test"), metrics=["region_attribution_mass"], num_samples=24)
    run = trainer(max_epochs=2, callbacks=[callback])
    run.fit(SmallCNN(), loader(_digits(32), 16))  # no validation loader at all
    assert callback.epochs_computed == 2
    assert torch.equal(callback._probes["validate"]["input"], DecoyDigits("test").images[:24])
    assert 0 < run.callback_metrics["attr/saliency/region_attribution_mass"].item() < 1
