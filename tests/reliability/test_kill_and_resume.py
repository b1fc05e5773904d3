"""SIGKILL a training run mid-epoch, resume it from ``last.ckpt`` in a new process: the result equals the
uninterrupted run's, parameters, optimizer and every callback's state (tests/reliability/resume_case.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CASE = Path(__file__).with_name("resume_case.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(out: Path, mode: str) -> None:
    result = subprocess.run(
        [sys.executable, str(CASE), str(out), mode], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, torch.Tensor):
        same = a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-6, rtol=1e-5)
        return [] if same else [f"{path}: max difference {(a.double() - b.double()).abs().max().item():.3g}"]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for key in a for d in _differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, (list, tuple)):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-6 + 1e-5 * abs(a) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.timeout(600)
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir()
    killed.mkdir()
    _run(full, "full")
    process = subprocess.Popen(
        [sys.executable, str(CASE), str(killed), "killed"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not (killed / "ready").exists():  # the checkpoint of step 8, mid-epoch, is written
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 8"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # no clean-up, no last words: as a preempted machine
    process.wait(timeout=60)
    assert torch.load(killed / "last.ckpt", weights_only=True)["global_step"] == 8
    _run(killed, "resume")
    expected = torch.load(full / "final-full.pt", weights_only=True)
    resumed = torch.load(killed / "final-resume.pt", weights_only=True)
    assert resumed["global_step"] == expected["global_step"] == 18
    assert len(expected["callbacks"]) == 8  # every callback of the library, each with its own state
    assert not _differences(expected, resumed), _differences(expected, resumed)
