"""A deliberate DDP deadlock, run only by test_ddp_faults.py in a pytest subprocess to check the watchdog.

Rank 0 enters an all-reduce while rank 1 never reaches one (it sleeps, as a rank stuck in I/O would). The file
name does not match ``test_*.py``, so a normal run does not collect it.
"""

import time

import pytest
import torch

from tests.helpers import MLP, DictDataset, loader, trainer


class Stuck(MLP):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 0:
            torch.distributed.all_reduce(torch.ones(1))
        else:
            time.sleep(3600)
        return super().training_step(batch, batch_idx)


@pytest.mark.ddp(timeout=15)
def test_hangs():
    x = torch.randn(8, 4)
    data = loader(DictDataset(input=x, target=torch.zeros(8, dtype=torch.long)), 4)
    trainer(max_steps=2, devices=2, strategy="ddp_spawn").fit(Stuck(), data)
