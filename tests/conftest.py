"""Shared fixtures: the Lightning package an integration test runs under, and the hard timeout of DDP tests."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.helpers import LIGHTNING_PACKAGES

# A collective that one rank never enters hangs the other forever; a DDP test that takes this long has hung.
# The thread method ends the whole run (spawned workers included) instead of leaving CI blocked.
DDP_TIMEOUT_S = 240


@pytest.fixture(params=sorted(LIGHTNING_PACKAGES))
def lightning_package(request: pytest.FixtureRequest) -> ModuleType:
    """``pytorch_lightning`` or ``lightning.pytorch``: the test runs once under each."""
    return LIGHTNING_PACKAGES[request.param]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DDP_TIMEOUT_S, method="thread"))
