"""Faults under DDP (two CPU processes, ddp_spawn, torch's default tensor sharing): no hang, no rank left behind.

``ddp_spawn`` does not bring callback state back, so the workers write what they saw to files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_xai.callbacks import ConceptEffect, ControlConceptHead, ExplanationPenalty
from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch
from tests.helpers import DictDataset, bind, loader, trainer

pytestmark = pytest.mark.ddp


class NaNOnRankOne(ControlConceptHead):
    """A head whose term is NaN on rank 1 at global step 1: the other rank's term is finite."""

    def __init__(self, record: str):
        super().__init__("features", "control", 2)
        self.record = record

    def compute_term(self, pl_module, context):
        value = super().compute_term(pl_module, context)
        if pl_module.global_rank == 1 and pl_module.global_step == 1:
            value = value * float("nan")
        return value

    def on_train_end(self, trainer, pl_module):
        seen = {"seen": self.steps_seen, "skipped": self.steps_skipped}
        Path(f"{self.record}.rank{trainer.global_rank}").write_text(json.dumps(seen))


def test_a_term_that_is_nan_on_one_rank_only_is_skipped_on_every_rank_and_training_finishes(tmp_path):
    # before: the NaN rank left the term out and did not log it, and the other rank waited in its all-reduce
    record = str(tmp_path / "seen")
    callbacks = [NaNOnRankOne(record), ExplanationPenalty("rrr", weight=1.0)]
    run = trainer(max_steps=3, devices=2, strategy="ddp_spawn", use_distributed_sampler=True, callbacks=callbacks)
    run.fit(bind(CompositionCNNBody)(), loader(cnn_batch(48), 8))  # find_unused_parameters=False: the skipped
    for rank in (0, 1):  # head's parameters must stay in the graph
        assert json.loads(Path(f"{record}.rank{rank}").read_text()) == {"seen": 3, "skipped": 1}
    assert torch.isfinite(run.callback_metrics["xai/total_step"])


class OnlyOnRankZero(Sampler):
    """Rank 0 gets every sample, rank 1 none: uneven validation, as a small or filtered split can give."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n) if torch.distributed.get_rank() == 0 else [])

    def __len__(self):
        return self.n


def test_concept_effect_on_a_rank_without_rows_gathers_with_the_others(tmp_path):
    from tests.callbacks.test_concept_heads import Encoder, planted

    data = planted(64)
    data["counterfactual_input"] = data["input"].flip(0)
    values = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        sampler = OnlyOnRankZero(64) if devices == 2 else None
        run = trainer(
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
            callbacks=[ConceptEffect("encoder", "gender")],
        )
        torch.manual_seed(1)
        run.validate(Encoder(), DataLoader(DictDataset(**data), batch_size=16, sampler=sampler), verbose=False)
        values[devices] = {k: v.item() for k, v in run.callback_metrics.items() if k.startswith("concept/")}
    assert {"concept/gender/ate_gt", "concept/gender/conexp", "concept/gender/probe_accuracy"} <= values[2].keys()
    for key, value in values[1].items():  # rank 0 held every row: the single-process values, exactly
        assert values[2][key] == pytest.approx(value, rel=1e-6), key


class RecordingReferences(ExplanationPenalty):
    def __init__(self, record: str):
        super().__init__("expected_gradients", weight=1.0)
        self.record = record

    def references(self, explained, samples, generator):
        chosen = super().references(explained, samples, generator)
        path = Path(f"{self.record}.rank{torch.distributed.get_rank()}")
        path.write_text(
            path.read_text() + json.dumps(chosen.flatten()[:32].tolist()) + "\n"
            if path.exists()
            else json.dumps(chosen.flatten()[:32].tolist()) + "\n"
        )
        return chosen


def test_expected_gradients_ranks_draw_different_references_and_one_sample_batches_get_a_penalty(tmp_path):
    # both ranks hold the same samples: with one seed everywhere they drew the same permutation, and with one
    # sample per rank the sample was its own reference (zero attribution, zero penalty)
    x, y, mask = torch.randn(4, 4), torch.tensor([0, 1, 0, 1]), torch.ones(4, 4)
    for batch_size in (4, 1):
        record = str(tmp_path / f"refs{batch_size}")
        run = trainer(
            max_steps=3,
            devices=2,
            strategy="ddp_spawn",
            use_distributed_sampler=False,
            callbacks=[RecordingReferences(record)],
        )
        from tests.helpers import MLP

        run.fit(MLP(), loader(DictDataset(input=x, target=y, mask=mask), batch_size))
        draws = [Path(f"{record}.rank{rank}").read_text().splitlines() for rank in (0, 1)]
        assert len(draws[0]) == len(draws[1]) == 3
        if batch_size > 1:
            assert draws[0] != draws[1]
        else:  # one sample per rank: a zero baseline first, then the samples of earlier steps
            assert json.loads(draws[0][0]) == [0.0] * 4 and json.loads(draws[0][1]) != [0.0] * 4
        assert run.callback_metrics["xai/expected_gradients_step"].item() > 0


@pytest.mark.ddp(timeout=300)
def test_a_hung_ddp_test_is_killed_and_fails_instead_of_blocking_the_run():
    # the watchdog of tests/conftest.py on a deliberate deadlock (hang_case.py), in a pytest of its own
    root = Path(__file__).resolve().parents[2]
    case = Path(__file__).with_name("hang_case.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", str(case)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0, result.stdout[-2000:]
    assert "ran past 15 s (a hang)" in result.stdout, result.stdout[-3000:]
