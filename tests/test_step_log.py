"""The per-step logging of XAIMixin and the concept heads: what plain ``self.log`` logs, at a tensor update's cost."""

from __future__ import annotations

import csv

import pytest
import torch

import lightning_xai._step_log as step_log
from lightning_xai.callbacks import ControlConceptHead, MutualInformationRegularizer
from tests.helpers import MLP, DictDataset, assert_ddp_matches_single, loader, trainer

pl = pytest.importorskip("pytorch_lightning")


def _data(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return DictDataset(
        input=torch.randn(n, 4, generator=g),
        target=torch.randint(0, 2, (n,), generator=g),
        sex=torch.randint(0, 2, (n,), generator=g),
        race=torch.randint(0, 3, (n,), generator=g),
    )


def _callbacks():
    return [
        MutualInformationRegularizer(["sex", "race"], [2, 3], weight=2.0, prog_bar=True),
        ControlConceptHead("net.1", "sex", 2, in_features=16, weight=0.5),
    ]


class _Record(pl.Callback):
    """Every step's metrics as the trainer shows them to callbacks, the progress bar and the logger."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.bars: list[dict[str, float]] = []
        self.rows: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.bars.append(dict(trainer.progress_bar_metrics))
        self.rows.append(len(batch["input"]))


def _fit(tmp_path, name):
    torch.manual_seed(0)
    record = _Record()
    logger = pl.loggers.CSVLogger(tmp_path, name=name)
    run = trainer(max_epochs=2, callbacks=[*_callbacks(), record], logger=logger, log_every_n_steps=1)
    run.fit(MLP(), loader(_data(), 4))  # batches of 4, 4 and 2 rows
    with open(f"{logger.log_dir}/metrics.csv") as file:
        logged = list(csv.DictReader(file))
    return record, {k: float(v) for k, v in run.callback_metrics.items()}, logged


def test_the_cheap_path_logs_exactly_what_self_log_logs(tmp_path, monkeypatch):
    taken = []
    registered = step_log._registered_result

    def spy(*args):
        result = registered(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(step_log, "_registered_result", spy)
    cheap = _fit(tmp_path, "cheap")
    # self.log registers the five keys at the first step and resets them at the second epoch's first call
    assert taken.count(False) == 5 + 1 and taken.count(True) == 2 * 3 * 5 - 6
    monkeypatch.setattr(step_log, "_registered_result", lambda *args: None)
    plain = _fit(tmp_path, "plain")
    (cheap_record, cheap_final, cheap_csv), (plain_record, plain_final, plain_csv) = cheap, plain
    assert cheap_record.steps == plain_record.steps  # bit for bit, step after step
    assert cheap_record.bars == plain_record.bars
    assert cheap_final == plain_final and cheap_csv == plain_csv
    shown = cheap_record.bars[-1].keys()
    assert {"xai/total_step", "xai/mutual_information_step"} <= shown and "xai/sex_control_step" not in shown
    assert {"xai/total", "xai/total_epoch", "concept/sex_control/accuracy", "concept/sex_control/loss"} <= (
        cheap_final.keys()
    )


def test_the_epoch_value_is_the_row_weighted_mean_of_the_step_values(tmp_path):
    record, final, _ = _fit(tmp_path, "run")
    assert record.rows == [4, 4, 2, 4, 4, 2]
    for key in ("xai/total", "xai/mutual_information"):
        for epoch in (0, 1):  # the second epoch starts again: the first epoch's steps are not in it
            steps = record.steps[3 * epoch : 3 * epoch + 3]
            rows = record.rows[3 * epoch : 3 * epoch + 3]
            mean = sum(step[f"{key}_step"] * n for step, n in zip(steps, rows)) / sum(rows)
            epoch_value = record.steps[3 * epoch + 3][f"{key}_epoch"] if epoch == 0 else final[f"{key}_epoch"]
            assert epoch_value == pytest.approx(mean, rel=1e-6), (key, epoch)
    # xai/total is the weighted sum at every step
    for step in record.steps:
        expected = 2.0 * step["xai/mutual_information_step"] + 0.5 * step["xai/sex_control_step"]
        assert step["xai/total_step"] == pytest.approx(expected, rel=1e-5)


def _sgd_mlp():
    torch.manual_seed(0)
    return MLP(optimizer="sgd", lr=0.5)


@pytest.mark.ddp
def test_ddp_epoch_values_over_several_steps_equal_the_single_process():
    # 16 rows in global batches of 8: two steps per epoch, so the second step of each epoch takes the cheap path;
    # step and epoch values are those of the global batches, as with self.log(sync_dist=True) every step
    results = assert_ddp_matches_single(
        _sgd_mlp,
        lambda: [MutualInformationRegularizer(["sex", "race"], [2, 3], weight=2.0)],
        _data(16),
        batch_size=8,
        max_epochs=2,
    )
    assert {"xai/total_epoch", "xai/total_step", "xai/mutual_information_epoch"} <= results[2]["values"].keys()
