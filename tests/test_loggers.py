"""Pictures, HTML and tables reach TensorBoard, CSV, MLflow and W&B (offline), next to the module's scalars.

Each backend test trains a tiny model for one epoch with a callback that logs from ``on_validation_epoch_end``, then
reads what the backend stored back from disk, under ``pytorch_lightning`` and under ``lightning.pytorch`` (whose
logger classes are separate copies).
"""

from __future__ import annotations

import csv
import io
import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import matplotlib.image as mpimg
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import loggers as xai_loggers
from lightning_xai._lightning import Callback
from lightning_xai.loggers import log_html, log_image, log_table
from lightning_xai.visualization import highlight_tokens_html
from tests.helpers import bind

H, W = 12, 20
IMAGE = np.zeros((H, W, 3), dtype=np.uint8)
IMAGE[..., 0] = np.arange(W, dtype=np.uint8)[None, :] * 12  # a red ramp left to right
IMAGE[: H // 2, :, 2] = 200  # blue top half
TOKENS = ["a", "<script>", "film"]
HTML = highlight_tokens_html(TOKENS, [0.5, -1.0, 0.25])
COLUMNS = ["group", "rate"]
ROWS = [["a|b", 0.5], ["c", 0.25]]


class TinyModelBody:
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MediaCallback(Callback):  # a callback of either package's Trainer
    def __init__(self):
        self.steps: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        step = trainer.global_step
        self.steps.append(step)
        log_image(trainer, "attribution/heatmap", IMAGE, step=step, caption="ramp")
        log_html(trainer, "attribution/tokens", HTML, step=step)
        log_table(trainer, "fairness/groups", COLUMNS, ROWS, step=step)


def _fit(logger, package=pl) -> tuple[pl.Trainer, MediaCallback]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16))
    callback = MediaCallback()
    trainer = package.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = bind(TinyModelBody, package)()
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert callback.steps == [2]
    trainer.xai_test_model, trainer.xai_test_data = model, DataLoader(data, batch_size=8)
    return trainer, callback


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(xai_loggers, "_WARNED", set())


def _assert_png(path: Path) -> None:
    back = mpimg.imread(path)  # float RGBA in [0, 1]
    assert back.shape[:2] == (H, W)
    np.testing.assert_allclose(back[..., :3], IMAGE / 255.0, atol=1 / 255)


def _assert_html(text: str) -> None:
    assert "&lt;script&gt;" in text and "<script>" not in text


def _assert_csv_table(text: str) -> None:
    assert list(csv.reader(io.StringIO(text))) == [COLUMNS, ["a|b", "0.5"], ["c", "0.25"]]


def test_tensorboard_and_csv_receive_pictures_html_tables_and_scalars(tmp_path, lightning_package):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = lightning_package.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = lightning_package.loggers.CSVLogger(str(tmp_path), name="csv")
    _fit([tb, csv_logger], lightning_package)

    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "attribution/heatmap" in tags["images"]
    (event,) = acc.Images("attribution/heatmap")
    assert (event.step, event.height, event.width) == (2, H, W)
    decoded = mpimg.imread(io.BytesIO(event.encoded_image_string), format="png")
    np.testing.assert_allclose(decoded[..., :3], IMAGE / 255.0, atol=1 / 255)
    html_tag, table_tag = "attribution/tokens/text_summary", "fairness/groups/text_summary"
    assert {html_tag, table_tag} <= set(tags["tensors"])
    _assert_html(acc.Tensors(html_tag)[0].tensor_proto.string_val[0].decode())
    table_md = acc.Tensors(table_tag)[0].tensor_proto.string_val[0].decode()
    assert table_md.splitlines() == ["| group | rate |", "|---|---|", "| a\\|b | 0.5 |", "| c | 0.25 |"]
    assert {"train_loss", "val_loss"} <= set(tags["scalars"])
    assert acc.Scalars("val_loss")[0].step == 1  # Lightning logs epoch-end metrics at global_step - 1

    media = Path(csv_logger.log_dir) / "media"
    assert sorted(p.name for p in media.iterdir()) == ["attribution_heatmap", "attribution_tokens", "fairness_groups"]
    _assert_png(media / "attribution_heatmap" / "step_2.png")
    _assert_html((media / "attribution_tokens" / "step_2.html").read_text(encoding="utf-8"))
    _assert_csv_table((media / "fairness_groups" / "step_2.csv").read_text(encoding="utf-8"))
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert any(row["val_loss"] for row in metrics) and any(row["train_loss"] for row in metrics)


def test_validate_and_test_after_fit_keep_the_fits_csv_pictures(tmp_path, lightning_package):
    csv_logger = lightning_package.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer, _ = _fit(csv_logger, lightning_package)
    heatmaps = Path(csv_logger.log_dir) / "media" / "attribution_heatmap"
    before = (heatmaps / "step_2.png").read_bytes()
    trainer.validate(trainer.xai_test_model, trainer.xai_test_data, verbose=False)
    assert sorted(p.name for p in heatmaps.iterdir()) == ["step_2.png", "validate_step_2.png"]
    assert (heatmaps / "step_2.png").read_bytes() == before
    _assert_png(heatmaps / "validate_step_2.png")


class _NotSupportedLogger(Logger):
    name = "custom"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _stub_trainer(*loggers, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=rank_zero, loggers=list(loggers))


def test_unknown_logger_warns_once_and_others_still_receive(tmp_path):
    csv_logger = CSVLogger(str(tmp_path))
    trainer = _stub_trainer(_NotSupportedLogger(), csv_logger)
    with pytest.warns(UserWarning, match="_NotSupportedLogger has no image adapter") as record:
        log_image(trainer, "k", IMAGE, step=0)
        log_image(trainer, "k", IMAGE, step=1)
    assert sum("_NotSupportedLogger" in str(w.message) for w in record) == 1
    assert (Path(csv_logger.log_dir) / "media" / "k" / "step_1.png").is_file()


def test_backend_failure_warns_once_and_does_not_raise(tmp_path):
    tb = TensorBoardLogger(str(tmp_path))
    csv_logger = CSVLogger(str(tmp_path))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    tb.experiment.add_text = broken
    trainer = _stub_trainer(tb, csv_logger)
    with pytest.warns(UserWarning, match="TensorBoardLogger failed with OSError: disk full") as record:
        log_html(trainer, "k", HTML, step=0)
        log_table(trainer, "t", COLUMNS, ROWS, step=0)  # table also goes through add_text: another kind, warned
        log_html(trainer, "k", HTML, step=1)
    messages = [str(w.message) for w in record if "disk full" in str(w.message)]
    assert len(messages) == 2 and "html" in messages[0] and "table" in messages[1]
    assert (Path(csv_logger.log_dir) / "media" / "k" / "step_1.html").is_file()  # the CSV logger still got it


def test_only_global_rank_zero_writes_and_no_loggers_is_a_no_op(tmp_path):
    csv_logger = CSVLogger(str(tmp_path))
    log_image(_stub_trainer(csv_logger, rank_zero=False), "k", IMAGE, step=0)
    log_html(_stub_trainer(csv_logger, rank_zero=False), "k", HTML, step=0)
    log_table(_stub_trainer(csv_logger, rank_zero=False), "k", COLUMNS, ROWS, step=0)
    assert not (Path(csv_logger.log_dir) / "media").exists()
    for fn, args in ((log_image, (IMAGE,)), (log_html, (HTML,)), (log_table, (COLUMNS, ROWS))):
        fn(_stub_trainer(), "k", *args, step=0)


def test_image_conversion_and_validation(tmp_path):
    csv_logger = CSVLogger(str(tmp_path))
    trainer = _stub_trainer(csv_logger)
    log_image(trainer, "float", IMAGE / 255.0, step=0)  # float in [0, 1]
    log_image(trainer, "grey", IMAGE[..., 0], step=0)  # (H, W)
    float_back = mpimg.imread(Path(csv_logger.log_dir) / "media" / "float" / "step_0.png")
    np.testing.assert_allclose(float_back[..., :3], IMAGE / 255.0, atol=1 / 255)
    grey_back = mpimg.imread(Path(csv_logger.log_dir) / "media" / "grey" / "step_0.png")
    np.testing.assert_allclose(grey_back[..., 1], IMAGE[..., 0] / 255.0, atol=1 / 255)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        log_image(trainer, "bad", np.zeros((3, H, W)), step=0)
    with pytest.raises(ValueError, match="row 0 has 1 values but there are 2 columns"):
        log_table(trainer, "bad", COLUMNS, [["a"]], step=0)


def test_mlflow_sqlite_store_receives_artifacts_and_scalars(tmp_path, monkeypatch, lightning_package):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store keeps its artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlruns.db"  # mlflow 3 refuses local file stores by default
    logger = lightning_package.loggers.MLFlowLogger(experiment_name="xai", tracking_uri=uri)
    trainer, _ = _fit(logger, lightning_package)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    artifacts = Path(unquote(urlparse(run.info.artifact_uri).path))
    _assert_png(artifacts / "media" / "attribution_heatmap" / "step_2.png")
    _assert_html((artifacts / "media" / "attribution_tokens" / "step_2.html").read_text(encoding="utf-8"))
    _assert_csv_table((artifacts / "media" / "fairness_groups" / "step_2.csv").read_text(encoding="utf-8"))
    assert {"train_loss", "val_loss"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(logger.run_id, "val_loss")] == [1]

    # validate() after fit logs at the same global step: a file of its own, the fit's picture stays
    before = (artifacts / "media" / "attribution_heatmap" / "step_2.png").read_bytes()
    trainer.validate(trainer.xai_test_model, trainer.xai_test_data, verbose=False)
    trainer.validate(trainer.xai_test_model, trainer.xai_test_data, verbose=False)
    names = sorted(p.name for p in (artifacts / "media" / "attribution_heatmap").iterdir())
    assert names == ["step_2.png", "validate_step_2-2.png", "validate_step_2.png"]
    assert (artifacts / "media" / "attribution_heatmap" / "step_2.png").read_bytes() == before


def _wandb_records(path: Path) -> list[bytes]:
    """Records of a W&B ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            records.append(pending + chunk)
            pending = b""
        else:
            break
    return records


def test_wandb_offline_run_receives_media_and_scalars(tmp_path, monkeypatch, lightning_package):
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    logger = lightning_package.loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="xai")
    try:
        _fit(logger, lightning_package)
    finally:
        wandb.finish()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    (png,) = (media / "images" / "attribution").glob("heatmap_*.png")
    _assert_png(png)
    (html_file,) = (media / "html" / "attribution").glob("tokens_*.html")
    _assert_html(html_file.read_text(encoding="utf-8"))
    (table_file,) = (media / "table" / "fairness").glob("groups_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == COLUMNS and table["data"] == ROWS

    # wandb.finish() can return before wandb-core has flushed the transaction log: wait for its exit record.
    (log_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 15.0
    while True:
        records = []
        for raw in _wandb_records(log_file):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(raw)
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    history: dict[str, list] = {}
    for record in records:
        if record.HasField("history"):
            row: dict = {}
            for item in record.history.item:  # wandb 0.31 flattens media dicts: nested_key = [key, field]
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = json.loads(item.value_json)
            for key, value in row.items():
                history.setdefault(key, []).append((row.get("trainer/global_step"), value))
    assert "attribution/heatmap" in history, f"history keys: {sorted(history)}"
    assert history["attribution/heatmap"][0][0] == 2
    assert history["attribution/heatmap"][0][1]["_type"] == "images/separated"
    assert history["attribution/heatmap"][0][1]["captions"] == ["ramp"]
    assert history["attribution/tokens"][0][1]["_type"] == "html-file"
    assert history["fairness/groups"][0][1]["_type"] == "table-file"
    assert [step for step, _ in history["val_loss"]] == [1] and len(history["train_loss"]) == 2
