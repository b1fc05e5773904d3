"""Cost of each explanation penalty as a ratio to a vanilla training step, measured in one run.

Steps run through the real path (Trainer -> XAIMixin -> ExplanationPenalty); a callback times each
training batch and the median after warm-up is reported. Models: the demo CNN on 28x28 ColorDigits-sized
inputs (batch 256) and the CDEP paper's SST classifier size: Embedding(300) + LSTM(128), batch 50, 40 tokens.

Interference on a shared machine only ever slows a run down, so every configuration is measured in
``--rounds`` interleaved rounds and its fastest median is kept.

Rows "<method> (finite difference)" train with ``differentiation="finite_difference"``: the exact penalty value with
a finite-difference parameter gradient (benchmarks/finite_difference_agreement.py measures its accuracy).

Composition rows: CDEP next to a hook on a submodule (a user's hook, as a concept head or an ``output_layer`` capture
installs) cannot share the step's forward and decomposes on its own; the row next to it shows that cost, and
"cdep + control head" a realistic pair.

The vanilla LSTM step runs oneDNN's fused CPU kernel; a second reference row times the same step on
PyTorch's native (unfused) LSTM, the kernel a step-by-step decomposition competes with.

    python benchmarks/penalty_overhead.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from color_digits import ColorCNN  # noqa: E402

from lightning_xai import XAIMixin  # noqa: E402
from lightning_xai.callbacks import ControlConceptHead, ExplanationPenalty  # noqa: E402
from lightning_xai.masks import OccupancyMaskSampler  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
TARGETS = {
    "cdep": 2.5,
    "rrr": 3.0,
    "expected_gradients": 3.0,
    "input_x_gradient": 3.0,
    # one more forward and backward of the batch: twice a vanilla step, plus the bookkeeping
    "ablation": 2.2,
    "counterexamples": 2.2,
    # a forward and a double backward from the logits down to the layer
    "rrr_gradcam": 3.0,
    "hint": 3.0,
    # third order: the double backward of a parameter gradient
    "rbr": 6.0,
    # differentiation="finite_difference": a first-order input gradient and one shifted forward (and its backward)
    # instead of the double backward
    "rrr (finite difference)": 2.0,
    "input_x_gradient (finite difference)": 2.0,
    "expected_gradients (finite difference)": 3.0,
}
FINITE_DIFFERENCE = ("rrr", "input_x_gradient", "expected_gradients")


class LSTMClassifier(XAIMixin, pl.LightningModule):
    def __init__(self, vocab: int = 2000, embed: int = 300, hidden: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, ids):
        return self.xai_forward_from_embeddings(self.embedding(ids), {})

    def xai_embed(self, input_ids):
        return self.embedding(input_ids)

    def xai_forward_from_embeddings(self, embeddings, batch):
        output, _ = self.lstm(embeddings)
        return self.head(output[:, -1])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class DemoCNN(ColorCNN):
    """The demo's CNN, reading the benchmark's dict batches."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])


class _SubmoduleHook(pl.Callback):
    """A user's own forward hook on the first convolution (it only counts calls)."""

    def setup(self, trainer, pl_module, stage):
        self.calls = 0
        pl_module.features[0].register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.durations.append(time.perf_counter() - self._start)


def _median_step(model_factory, batch, callbacks, steps: int) -> float:
    torch.manual_seed(0)
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *callbacks],
    )
    trainer.fit(model_factory(), DataLoader([batch] * steps, batch_size=None))
    return statistics.median(timer.durations[2:])


def _finite_difference_rows() -> dict:
    return {
        f"{method} (finite difference)": lambda method=method: ExplanationPenalty(
            method=method, differentiation="finite_difference"
        )
        for method in FINITE_DIFFERENCE
    }


def _as_list(callbacks) -> list:
    return callbacks if isinstance(callbacks, list) else [callbacks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=["cnn", "lstm"], default=["cnn", "lstm"])
    parser.add_argument(
        "--only", nargs="+", help="time only these methods (and their variants, e.g. 'rrr (finite difference)')"
    )
    args = parser.parse_args()
    console = Console(width=120)
    generator = torch.Generator().manual_seed(0)

    images = torch.rand(256, 3, 28, 28, generator=generator) * (torch.rand(256, 1, 28, 28, generator=generator) > 0.6)
    pixel_mask = torch.zeros(256, 1, 28, 28)
    pixel_mask[torch.arange(256), 0, torch.randint(0, 28, (256,)), torch.randint(0, 28, (256,))] = 1
    cnn_batch = {"input": images, "target": torch.randint(0, 10, (256,)), "mask": pixel_mask}
    ids = torch.randint(0, 2000, (50, 40), generator=generator)
    span_mask = torch.zeros(50, 40)
    span_mask[:, 10:15] = 1
    lstm_batch = {"input": ids, "target": torch.randint(0, 2, (50,)), "mask": span_mask}

    setups = [
        (
            "CNN 28x28, batch 256",
            lambda: DemoCNN(28),
            cnn_batch,
            {
                "cdep (sampler, 1 pixel/sample)": lambda: ExplanationPenalty(
                    method="cdep", mask_sampler=OccupancyMaskSampler(occupancy=torch.ones(28, 28))
                ),
                "cdep": lambda: ExplanationPenalty(method="cdep"),
                "rrr": lambda: ExplanationPenalty(method="rrr"),
                "expected_gradients": lambda: ExplanationPenalty(method="expected_gradients"),
                "input_x_gradient": lambda: ExplanationPenalty(method="input_x_gradient"),
                "ablation": lambda: ExplanationPenalty(method="ablation"),
                "rrr_gradcam": lambda: ExplanationPenalty(method="rrr_gradcam"),
                "hint": lambda: ExplanationPenalty(method="hint"),
                "rbr": lambda: ExplanationPenalty(method="rbr"),
                "counterexamples": lambda: ExplanationPenalty(method="counterexamples"),
                **_finite_difference_rows(),
                "vanilla + submodule hook": lambda: [_SubmoduleHook()],
                "cdep + submodule hook (own decomposition)": lambda: [ExplanationPenalty("cdep"), _SubmoduleHook()],
                "control head": lambda: ControlConceptHead("features", "target", 10),
                "cdep + control head": lambda: [
                    ExplanationPenalty("cdep"),
                    ControlConceptHead("features", "target", 10),
                ],
            },
        ),
        (
            "LSTM 300/128, 40 tokens, batch 50",
            LSTMClassifier,
            lstm_batch,
            {
                "cdep": lambda: ExplanationPenalty(method="cdep", cdep_variant="text"),
                "rrr": lambda: ExplanationPenalty(method="rrr"),
                "expected_gradients": lambda: ExplanationPenalty(method="expected_gradients"),
                "input_x_gradient": lambda: ExplanationPenalty(method="input_x_gradient"),
                "ablation": lambda: ExplanationPenalty(method="ablation"),
                "rrr_gradcam": lambda: ExplanationPenalty(method="rrr_gradcam", layer="lstm"),
                "counterexamples": lambda: ExplanationPenalty(method="counterexamples"),
                **_finite_difference_rows(),
            },
        ),
    ]
    setups = [setup for setup in setups if setup[0].split(" ")[0].lower() in args.models]
    configurations = []
    for title, factory, batch, penalties in setups:
        configurations.append((title, "vanilla", factory, batch, lambda: [], False))
        if factory is LSTMClassifier:
            configurations.append((title, "vanilla, native unfused LSTM", factory, batch, lambda: [], True))
        for label, make in penalties.items():
            if args.only and not any(label == name or label.startswith(f"{name} (") for name in args.only):
                continue
            configurations.append((title, label, factory, batch, lambda make=make: _as_list(make()), False))
    fastest: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for title, label, factory, batch, callbacks, unfused in configurations:
            with torch.backends.mkldnn.flags(enabled=not unfused):
                seconds = _median_step(factory, batch, callbacks(), args.steps)
            fastest[(title, label)] = min(seconds, fastest.get((title, label), float("inf")))

    table = Table(
        title=f"Training-step cost relative to a vanilla step (fastest of {args.rounds} medians of "
        f"{args.steps - 2} steps, CPU, {torch.get_num_threads()} threads)"
    )
    for column in ("model", "penalty", "ms / step", "x vanilla", "target"):
        table.add_column(column, justify="left" if column in ("model", "penalty") else "right", no_wrap=True)
    previous_title = None
    for title, label, *_ in configurations:
        seconds, vanilla = fastest[(title, label)], fastest[(title, "vanilla")]
        target = None if "+" in label else TARGETS.get(label, TARGETS.get(label.split(" ")[0]))
        table.add_row(
            title if title != previous_title else "",
            label,
            f"{1000 * seconds:.1f}",
            f"{seconds / vanilla:.2f}",
            f"<= {target}" if target else "",
        )
        previous_title = title
    console.print(table)


if __name__ == "__main__":
    main()
