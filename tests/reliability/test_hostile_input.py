"""Hostile names and files: what a user's data or a downloaded checkpoint may carry never runs, breaks a logger or
hides in a picture."""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_xai import loggers as xai_loggers
from lightning_xai.callbacks import (
    AdversarialConceptHead,
    AttributionMetrics,
    ConceptEffect,
    ExplanationPenalty,
    FairnessMetrics,
    MutualInformationRegularizer,
    strip_concept_heads,
)
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.loggers import log_html, log_image, log_table
from lightning_xai.visualization import highlight_tokens_html, render_cell_rates, render_tokens_png
from tests.callbacks.test_fairness_metrics import Classifier, tabular
from tests.helpers import DictDataset, loader, trainer

HOSTILE_NAMES = ["../x", "a/b", "..", ".", "", "$\\frac$", "x\u202ey", "n\x00l", "a b", "x" * 101]
CALLBACKS_WITH_NAMES = {
    "ExplanationPenalty": lambda name: ExplanationPenalty("rrr", name=name),
    "MutualInformationRegularizer": lambda name: MutualInformationRegularizer(["sex"], [2], name=name),
    "AdversarialConceptHead": lambda name: AdversarialConceptHead("features", "gender", 2, name=name),
    "AttributionMetrics": lambda name: AttributionMetrics(name=name),
    "FairnessMetrics": lambda name: FairnessMetrics(["sex"], [2], name=name),
    "ConceptEffect": lambda name: ConceptEffect("features", "gender", name=name),
    "ConceptEffect (concept key)": lambda name: ConceptEffect("features", name),
}


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
@pytest.mark.parametrize("callback", sorted(CALLBACKS_WITH_NAMES))
def test_names_that_reach_log_keys_are_checked_when_the_callback_is_built(callback, name):
    with pytest.raises(XAIConfigurationError, match="letters, digits, '_', '-' and '.'"):
        CALLBACKS_WITH_NAMES[callback](name)


@pytest.mark.parametrize("name", ["../x", "a/b", "$\\frac$", "x\u202ey"], ids=repr)
def test_a_concept_key_that_names_a_head_is_checked_too(name):
    # the default name "<concept_key>_adversary" is a log key
    with pytest.raises(XAIConfigurationError, match="letters, digits"):
        AdversarialConceptHead("features", name, 2)


def test_hostile_attribute_names_become_safe_cells_that_every_logger_and_the_chart_accept(tmp_path, monkeypatch):
    # before: "fair/cell/../../x0/count" raised MlflowException and ended the fit, and "$\frac$" crashed the chart
    pytest.importorskip("sqlalchemy")
    monkeypatch.chdir(tmp_path)
    data = tabular(96)
    hostile = {"../../x": data["sex"], "$\\frac$": data["race"]}
    batches = DictDataset(input=data["input"], target=data["target"], **hostile)
    callback = FairnessMetrics(list(hostile), [2, 3], attribute_columns={"../../x": [2, 3], "$\\frac$": [4, 5, 6]})
    mlflow = pl.loggers.MLFlowLogger(experiment_name="xai", tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    csv_logger = CSVLogger(tmp_path, name="csv")
    run = trainer(callbacks=[callback], logger=[mlflow, csv_logger])
    run.validate(Classifier(), loader(batches, 32), verbose=False)
    keys = [key for key in run.callback_metrics if key.startswith("fair/cell/")]
    assert keys and not any("/../" in key or "$" in key or "\\" in key for key in keys)
    assert "fair/cell/..-..-x0_--frac-0/count" in keys and "fair/flip/..-..-x/flip_rate" in run.callback_metrics
    assert callback.epochs_computed == 1
    assert list((Path(csv_logger.log_dir) / "media" / "fair_cell_rates").glob("validate_step_0.png"))


def test_two_keys_that_share_a_folder_name_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(xai_loggers, "_FOLDERS", {})
    csv_logger = CSVLogger(tmp_path)
    stub = type("Stub", (), {"is_global_zero": True, "loggers": [csv_logger]})()
    red, blue = np.zeros((4, 4, 3), dtype=np.uint8), np.full((4, 4, 3), 255, dtype=np.uint8)
    log_image(stub, "attr/x", red, step=0)
    log_image(stub, "attr_x", blue, step=0)  # the same safe folder name: attr_x
    media = Path(csv_logger.log_dir) / "media"
    folders = sorted(p.name for p in media.iterdir())
    assert len(folders) == 2 and folders[0] == "attr_x" and folders[1].startswith("attr_x-")
    import matplotlib.image as mpimg

    assert mpimg.imread(media / "attr_x" / "step_0.png")[..., 0].max() == 0.0  # attr/x kept its own picture
    assert mpimg.imread(media / folders[1] / "step_0.png")[..., 0].min() == 1.0


def test_table_cells_that_a_spreadsheet_would_run_are_written_as_text(tmp_path):
    csv_logger = CSVLogger(tmp_path)
    stub = type("Stub", (), {"is_global_zero": True, "loggers": [csv_logger]})()
    rows = [['=HYPERLINK("http://x")', -1.5], ["+cmd", "@SUM(A1)"], ["-2+3", "plain"]]
    log_table(stub, "cells", ["=name", "value"], rows, step=0)
    text = (Path(csv_logger.log_dir) / "media" / "cells" / "step_0.csv").read_text()
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["'=name", "value"]
    assert parsed[1] == ['\'=HYPERLINK("http://x")', "-1.5"]  # a number stays a number
    assert parsed[2] == ["'+cmd", "'@SUM(A1)"] and parsed[3] == ["'-2+3", "plain"]


def test_control_and_bidirectional_characters_are_shown_not_obeyed():
    tokens = ["safe", "exe\u202etxt.", "nul\x00", "\u2066iso"]
    html = highlight_tokens_html(tokens, [0.1, 0.5, -0.2, 0.3])
    assert "\u202e" not in html and "\x00" not in html and "\u2066" not in html
    assert "&lt;U+202E&gt;" in html and "&lt;U+0000&gt;" in html and "&lt;U+2066&gt;" in html
    image = render_tokens_png([tokens], [[0.1, 0.5, -0.2, 0.3]])
    assert image.dtype == np.uint8 and image.shape[2] == 3
    chart = render_cell_rates(["$\\frac$", "a\u202eb"], {"pos_rate": [0.2, 0.4]}, title="$x^{$")  # no mathtext
    assert chart.shape[2] == 3
    stub_html = []
    stub = type("Stub", (), {"is_global_zero": True, "loggers": []})()
    log_html(stub, "k", "<b>\u202ex</b>", step=0)  # no loggers: nothing to assert but that it does not raise
    assert not stub_html


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    path = tmp_path / "crafted.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"net.weight": torch.ones(1)}, "payload": _RunsCode()}, f)
    with pytest.raises(XAIConfigurationError, match="weights_only=True"):
        strip_concept_heads(path)
    assert not Path(MARKER).exists()


def test_a_real_lightning_checkpoint_with_hyperparameters_and_heads_is_stripped(tmp_path):
    from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch
    from tests.helpers import bind

    class WithHparams(CompositionCNNBody):
        def __init__(self, width: int = 8):
            super().__init__()
            self.save_hyperparameters()

    model = bind(WithHparams)()
    run = trainer(max_steps=1, callbacks=[AdversarialConceptHead("features", "gender", 2)])
    run.fit(model, loader(cnn_batch(), 8))
    run.save_checkpoint(tmp_path / "model.ckpt")
    stripped = strip_concept_heads(tmp_path / "model.ckpt", tmp_path / "bare.ckpt")
    assert stripped["hyper_parameters"] == {"width": 8}
    assert not any("xai_concept_heads" in key for key in stripped["state_dict"])
    bind(CompositionCNNBody)().load_state_dict(torch.load(tmp_path / "bare.ckpt", weights_only=True)["state_dict"])
