"""Two CPU processes under ddp_spawn must give the penalty and the update of one process on the global batch."""

import copy

import pytest
import torch
from torch.nn import functional as F

from lightning_xai.attribution import contextual_decomposition
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.functional import cdep_penalty, rrr_penalty
from tests.helpers import MLP, DictDataset, decoy_tabular, loader, trainer


@pytest.fixture(autouse=True)
def _share_tensors_through_files():
    # Containers often give /dev/shm only a few MB; file-backed sharing lets spawned workers receive tensors.
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


@pytest.mark.parametrize("method", ["rrr", "cdep"])
def test_ddp_spawn_two_processes_equal_single_process_on_global_batch(method):
    torch.manual_seed(0)
    x, y, mask = decoy_tabular(8)
    data = DictDataset(input=x, target=y, mask=mask)
    model = MLP(optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(model)
    weight = 2.0

    run = trainer(
        max_steps=1,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=True,
        callbacks=[ExplanationPenalty(method=method, weight=weight)],
    )
    run.fit(model, loader(data, 4))  # each rank sees 4 of the 8 samples

    if method == "rrr":
        penalty = rrr_penalty(reference, x, mask)
    else:
        penalty = cdep_penalty(*contextual_decomposition(reference, x, mask))
    # the logged value is the mean over ranks (sync_dist), which equals the penalty on the global batch
    assert run.callback_metrics[f"xai/{method}_step"].item() == pytest.approx(penalty.item(), rel=1e-5)
    loss = F.cross_entropy(reference(x), y) + weight * penalty
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    # ddp_spawn sends the trained weights back to the main process
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter.detach(), before.detach() - 0.5 * gradient, atol=1e-5, rtol=1e-4)
