"""One training run with every callback, for the kill-and-resume test (test_kill_and_resume.py runs it).

``python resume_case.py OUT full``: trains to the end and saves every state to ``OUT/final.pt``.
``python resume_case.py OUT killed``: the same, but after the checkpoint of step KILL_AT it announces itself
(``OUT/ready``) and hangs until the test SIGKILLs it.
``python resume_case.py OUT resume``: resumes from ``OUT/last.ckpt`` and trains to the end, saving ``final.pt``.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from lightning_xai.callbacks import (
    AdversarialConceptHead,
    AttributionMetrics,
    ConceptEffect,
    ControlConceptHead,
    ExplanationPenalty,
    FairnessMetrics,
    MutualInformationRegularizer,
)
from lightning_xai.masks import OccupancyMaskSampler
from tests.callbacks.test_composition import CompositionCNNBody, cnn_batch
from tests.helpers import bind, loader

BATCHES_PER_EPOCH, EPOCHS, KILL_AT = 6, 3, 8  # step 8 is the third batch of the second epoch


class ResumableBatches:
    """Shuffled batches of a dataset, seeded per epoch, that resume mid-epoch (the ``state_dict`` Lightning asks
    of a train loader to resume inside an epoch)."""

    def __init__(self, dataset, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.epoch, self.index = -1, 0  # the epoch being iterated, and the batch within it
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def __iter__(self):
        # a fresh epoch, or the rest of the one a checkpoint stopped in (read when iteration starts)
        epoch, start = self._resume if self._resume is not None else (self.epoch + 1, 0)
        self._resume = None
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(epoch))
        for index in range(start, len(self)):
            self.epoch, self.index = epoch, index
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            yield {key: torch.stack([self.dataset[int(i)][key] for i in rows]) for key in self.dataset[0]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index + 1}  # saved after the batch `index` trained

    def load_state_dict(self, state: dict) -> None:
        self._resume = (state["epoch"], state["index"])


class HangAfterCheckpoint(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == KILL_AT:  # the checkpoint of step KILL_AT was written after the previous batch
            (self.out / "ready").write_text(str(trainer.global_step))
            time.sleep(3600)


class Model(CompositionCNNBody):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])


def callbacks() -> list[pl.Callback]:
    return [
        ExplanationPenalty("cdep", weight=1.0, mask_sampler=OccupancyMaskSampler(seed=3)),
        ExplanationPenalty("expected_gradients", weight=1.0, name="eg", seed=5),
        MutualInformationRegularizer(["sex"], [2], weight=1.0, momentum=0.9),
        AdversarialConceptHead("features", "gender", 2, schedule="dann"),
        ControlConceptHead("features", "control", 2, schedule="linear_warmup", warmup_steps=5),
        AttributionMetrics("saliency", num_samples=8, batch_size=8, pictures_every_n_epochs=0),
        FairnessMetrics(["sex"], [2], pictures_every_n_epochs=0),
        ConceptEffect("features", "gender"),
    ]


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = bind(Model)()
    torch.manual_seed(1)
    for callback in (c := callbacks()):  # the heads exist before the optimizer is built, from one seed
        if isinstance(callback, ControlConceptHead | AdversarialConceptHead):
            callback.setup(None, model, "validate")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_last=True, save_top_k=-1)
    extra = [HangAfterCheckpoint(out)] if mode == "killed" else []
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[*c, checkpoint, *extra],
    )
    train = ResumableBatches(cnn_batch(BATCHES_PER_EPOCH * 8, seed=4), 8)
    trainer.fit(
        model, train, loader(cnn_batch(16, seed=5), 8), ckpt_path=out / "last.ckpt" if mode == "resume" else None
    )
    states = {type(cb).__name__ + ":" + cb.state_key: cb.state_dict() for cb in c}
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "callbacks": states,
            "global_step": trainer.global_step,
        },
        out / f"final-{mode}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
