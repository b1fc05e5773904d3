"""Shared fixtures: the Lightning package an integration test runs under, and the hard limit of DDP tests."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import ModuleType

import pytest

# The suite's models are tiny: compiling CD's fused bias-split kernel (seconds per process, and every ddp_spawn
# worker is a new process) would cost more than it saves. tests/functional/test_cd_kernels.py tests the compiled
# kernel against this eager one.
os.environ.setdefault("LIGHTNING_XAI_CD_KERNEL", "eager")

from tests.helpers import LIGHTNING_PACKAGES

# A collective that one rank never enters hangs the other ranks forever. After this long a DDP test has hung: the
# watchdog kills its worker processes (so ddp_spawn's join fails the test at once, and no worker outlives the run),
# and pytest-timeout ends the whole run a minute later should the test process itself be stuck.
DDP_TIMEOUT_S = 240


@pytest.fixture(params=sorted(LIGHTNING_PACKAGES))
def lightning_package(request: pytest.FixtureRequest) -> ModuleType:
    """``pytorch_lightning`` or ``lightning.pytorch``: the test runs once under each."""
    return LIGHTNING_PACKAGES[request.param]


def _ddp_limit(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker("ddp")
    return None if marker is None else float(marker.kwargs.get("timeout", DDP_TIMEOUT_S))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        limit = _ddp_limit(item)
        if limit is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit + 60, method="thread"))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


@pytest.fixture(autouse=True)
def _ddp_watchdog(request: pytest.FixtureRequest):
    limit = _ddp_limit(request.node)
    if limit is None:
        yield
        return
    fired = threading.Event()

    def kill_workers() -> None:
        fired.set()
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    timer = threading.Timer(limit, kill_workers)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if fired.is_set():
        pytest.fail(f"the DDP test ran past {limit:g} s (a hang): its worker processes were killed")
