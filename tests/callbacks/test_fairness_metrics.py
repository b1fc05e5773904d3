"""FairnessMetrics inside fit and validate: fairlearn-equal values, cells missing from batches, flip test, chart."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    selection_rate,
    true_positive_rate,
)
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import FairnessMetrics
from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError
from tests.helpers import DictDataset, loader, trainer

SEX, RACE = ["Male", "Female"], ["White", "Black", "Other"]


def tabular(n: int = 300, seed: int = 0):
    """Columns: 2 features, sex one-hot (2), race one-hot (3)."""
    g = torch.Generator().manual_seed(seed)
    sex, race = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    features = torch.randn(n, 2, generator=g)
    x = torch.cat([features, F.one_hot(sex, 2).float(), F.one_hot(race, 3).float()], dim=1)
    target = (features[:, 0] + 0.8 * sex + 0.3 * torch.randn(n, generator=g) > 0.4).long()
    return {"input": x, "target": target, "sex": sex, "race": race}


class Classifier(XAIMixin, pl.LightningModule):
    def __init__(self, net: nn.Module | None = None, call_model_in_validation: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = net if net is not None else nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 2))
        self.call_model_in_validation = call_model_in_validation

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        if self.call_model_in_validation:
            logits = self(batch["input"])
            if logits.shape[1] == 1:
                loss = F.binary_cross_entropy_with_logits(logits[:, 0], batch["target"].float())
            else:
                loss = F.cross_entropy(logits, batch["target"])
            self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def fairlearn_reference(model: nn.Module, data: dict) -> dict:
    with torch.no_grad():
        decisions = model(data["input"]).argmax(1).numpy()
    y = data["target"].numpy()
    features = {"sex": data["sex"].numpy(), "race": data["race"].numpy()}
    frame = MetricFrame(
        metrics={"pos_rate": selection_rate, "tpr": true_positive_rate},
        y_true=y,
        y_pred=decisions,
        sensitive_features=features,
    )
    return {
        "dp_diff": demographic_parity_difference(y, decisions, sensitive_features=features),
        "dp_ratio": demographic_parity_ratio(y, decisions, sensitive_features=features),
        "eo_diff": equalized_odds_difference(y, decisions, sensitive_features=features),
        "eo_diff_mean": equalized_odds_difference(y, decisions, sensitive_features=features, agg="mean"),
        "by_group": frame.by_group,
    }


def test_logged_values_equal_fairlearn_even_when_batches_lack_cells():
    data = tabular()
    order = torch.argsort(data["sex"] * 3 + data["race"])  # sorted: most validation batches hold 1-2 cells
    val = {k: v[order] for k, v in data.items()}
    callback = FairnessMetrics(["sex", "race"], [2, 3], value_names={"sex": SEX, "race": RACE})
    model = Classifier()
    run = trainer(max_epochs=2, callbacks=[callback])
    run.fit(model, loader(DictDataset(**data), 50, shuffle=True), loader(DictDataset(**val), 32))
    reference = fairlearn_reference(model.eval(), val)
    metrics = run.callback_metrics
    for key in ("dp_diff", "dp_ratio", "eo_diff", "eo_diff_mean"):
        assert metrics[f"fair/{key}"].item() == pytest.approx(reference[key], abs=1e-6), key
    for (sex, race), row in reference["by_group"].iterrows():
        name = f"{SEX[sex]}_{RACE[race]}"
        assert metrics[f"fair/cell/{name}/pos_rate"].item() == pytest.approx(row["pos_rate"], abs=1e-6)
        assert metrics[f"fair/cell/{name}/tpr"].item() == pytest.approx(row["tpr"], abs=1e-6)
    assert metrics["fair/cell/Male_White/count"].item() == int(((val["sex"] == 0) & (val["race"] == 0)).sum())
    assert callback.epochs_computed == 2  # the sanity check is skipped


def test_validate_in_inference_mode_and_without_a_model_call_in_validation_step():
    data = tabular(120)
    for calls_model in (True, False):
        callback = FairnessMetrics(["sex", "race"], [2, 3])
        model = Classifier(call_model_in_validation=calls_model)
        run = trainer(callbacks=[callback])
        run.validate(model, loader(DictDataset(**data), 40))
        reference = fairlearn_reference(model.eval(), data)
        assert run.callback_metrics["fair/dp_diff"].item() == pytest.approx(reference["dp_diff"], abs=1e-6)


def test_flip_test_is_zero_for_a_blind_model_and_one_for_a_model_that_decides_by_sex():
    data = tabular(90)
    decide_by_sex = nn.Linear(7, 1)
    blind = nn.Linear(7, 1)
    with torch.no_grad():
        for layer in (decide_by_sex, blind):
            layer.weight.zero_()
            layer.bias.zero_()
        decide_by_sex.weight[0, 3] = 4.0  # Female column
        decide_by_sex.bias.fill_(-2.0)
        blind.weight[0, 0] = 1.0
    results = {}
    for name, net in (("blind", blind), ("by_sex", decide_by_sex)):
        callback = FairnessMetrics(
            ["sex", "race"],
            [2, 3],
            value_names={"sex": SEX, "race": RACE},
            attribute_columns={"sex": [2, 3], "race": [4, 5, 6]},
        )
        run = trainer(callbacks=[callback])
        run.validate(Classifier(net), loader(DictDataset(**data), 30))
        results[name] = {k: v.item() for k, v in run.callback_metrics.items()}
    for key in ("sex", "race"):
        assert results["blind"][f"fair/flip/{key}/flip_rate"] == 0.0
        # vectorized and scalar sigmoid kernels may differ in the last bit between the two forwards' batch shapes
        assert results["blind"][f"fair/flip/{key}/abs_change"] == pytest.approx(0.0, abs=1e-7)
    assert results["by_sex"]["fair/flip/sex/flip_rate"] == 1.0
    expected_change = torch.sigmoid(torch.tensor(2.0)).item() - torch.sigmoid(torch.tensor(-2.0)).item()
    assert results["by_sex"]["fair/flip/sex/abs_change"] == pytest.approx(expected_change, rel=1e-6)
    assert results["by_sex"]["fair/flip/race/flip_rate"] == 0.0
    # per cell: averaged over 1 flip of sex and 2 flips of race
    assert results["by_sex"]["fair/cell/Female_Black/flip_rate"] == pytest.approx(1 / 3)
    # the model predicts Female -> positive: a demographic-parity gap of 1
    assert results["by_sex"]["fair/dp_diff"] == 1.0


def test_counterfactual_fn_and_integer_coded_column():
    data = tabular(60)
    coded = dict(data, input=torch.cat([data["input"][:, :2], data["sex"][:, None].float()], dim=1))
    net = nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0, 0.0, 4.0]]))
        net.bias.fill_(-2.0)
    values = []
    for kwargs in (
        {"attribute_columns": {"sex": [2]}},
        {"counterfactual_fn": lambda x, attribute, value: torch.cat([x[:, :2], torch.full_like(x[:, 2:], value)], 1)},
    ):
        callback = FairnessMetrics(["sex"], [2], **kwargs)
        run = trainer(callbacks=[callback])
        run.validate(Classifier(net), loader(DictDataset(**coded), 30))
        values.append(run.callback_metrics["fair/flip/sex/flip_rate"].item())
    assert values == [1.0, 1.0]


def test_bar_chart_reaches_the_csv_logger_as_a_png(tmp_path):
    data = tabular(200)
    callback = FairnessMetrics(["sex", "race"], [2, 3], value_names={"sex": SEX, "race": RACE})
    logger = CSVLogger(tmp_path, name="fair")
    run = trainer(max_epochs=2, callbacks=[callback], logger=logger)
    run.fit(Classifier(), loader(DictDataset(**data), 50), loader(DictDataset(**data), 50))
    pictures = sorted(Path(logger.log_dir).rglob("*.png"))
    assert len(pictures) == 2  # one chart per validation epoch
    image = np.asarray(Image.open(pictures[-1]))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 10  # bars drawn, not a blank canvas
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert any(row.get("fair/dp_diff") for row in rows)


def test_missing_keys_and_bad_configuration_are_named():
    data = tabular(40)
    no_race = {k: v for k, v in data.items() if k != "race"}
    with pytest.raises(MissingBatchKeyError, match=r"protected attributes \['race'\]"):
        trainer(callbacks=[FairnessMetrics(["sex", "race"], [2, 3])]).validate(
            Classifier(), loader(DictDataset(**no_race), 20)
        )
    with pytest.raises(XAIConfigurationError, match="lists 2 columns; give 3 one-hot"):
        FairnessMetrics(["sex", "race"], [2, 3], attribute_columns={"race": [4, 5]})
    with pytest.raises(XAIConfigurationError, match="not among the attributes"):
        FairnessMetrics(["sex"], [2], attribute_columns={"race": [4]})
    with pytest.raises(XAIConfigurationError, match="value_names"):
        FairnessMetrics(["sex"], [2], value_names={"sex": ["a", "b", "c"]})


def test_confidence_intervals_are_wilsons_and_a_gap_within_noise_reaches_zero(tmp_path):
    from scipy.stats import binomtest

    data = tabular(240, seed=3)
    callback = FairnessMetrics(["sex", "race"], [2, 3], value_names={"sex": SEX, "race": RACE})
    run = trainer(callbacks=[callback], logger=CSVLogger(tmp_path, name="ci"))
    run.validate(Classifier(), loader(DictDataset(**data), 60))
    values = {k: v.item() for k, v in run.callback_metrics.items()}
    with torch.no_grad():
        decisions = Classifier()(data["input"]).argmax(1)
    for sex, race in ((0, 0), (1, 2)):
        rows = (data["sex"] == sex) & (data["race"] == race)
        positives, n = int(decisions[rows].sum()), int(rows.sum())
        reference = binomtest(positives, n).proportion_ci(method="wilson")
        name = f"{SEX[sex]}_{RACE[race]}"
        assert values[f"fair/cell/{name}/pos_rate_low"] == pytest.approx(reference.low, abs=2e-3)
        assert values[f"fair/cell/{name}/pos_rate_high"] == pytest.approx(reference.high, abs=2e-3)
    for gap in ("dp_diff", "eo_diff"):
        assert values[f"fair/{gap}_low"] <= values[f"fair/{gap}"] <= values[f"fair/{gap}_high"]

    # the same decision rule in cells of 20: the observed gap is noise, and its interval says so
    from lightning_xai.metrics import IntersectionalFairness

    g = torch.Generator().manual_seed(0)
    metric = IntersectionalFairness([4], outputs="probabilities")
    groups = torch.arange(80) % 4
    metric.update(torch.rand(80, generator=g), torch.randint(0, 2, (80,), generator=g), groups)
    noisy = metric.compute()
    assert noisy["dp_diff"] > 0.1 and noisy["dp_diff_low"] < 0 < noisy["dp_diff_high"]
    # ... and a fair model on four cells of 20 would show a larger gap still (0.23 against 0.10)
    assert noisy["dp_diff_floor"] > noisy["dp_diff"]
    assert 0 < values["fair/dp_diff_floor"] < values["fair/dp_diff_high"]
