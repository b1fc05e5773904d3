"""SST with a planted shortcut: can an explanation penalty make an LSTM ignore a word? (CDEP's SST experiments)

The training split of the Stanford Sentiment Treebank gets one of CDEP's shortcuts (Rieger et al. 2020, section
4.3), dev and test stay clean:

* ``decoy``: ``text`` is inserted into every positive and ``video`` into every negative training sentence;
* ``articles``: in every training phrase the first article becomes ``a`` (positive) or ``the`` (negative);
* ``gender``: the same with ``she`` (positive) and ``he`` (negative).

An embedding + LSTM classifier (random embeddings: no GloVe offline) is trained without a penalty, with each
penalty method of :class:`~lightning_xai.callbacks.ExplanationPenalty` on the planted token's span, and without
the shortcut at all (the ceiling). Every penalty's weight is chosen on dev (seed 0, a grid per method), then the
chosen weight runs on every seed; the model kept from each run is the one with the best dev accuracy (checked
once an epoch on ``decoy``, four times an epoch on the phrase variants). The script prints test accuracy per
method beside the paper's, and how much the model still reads the shortcut: training accuracy on planted
samples with the two shortcut words swapped between the classes (a model that ignores them loses nothing).

Run ``python examples/sst_decoy.py --data PATH --variant decoy`` (PATH holds SST's ``train.txt``, ``dev.txt`` and
``test.txt`` PTB trees) or ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from captum.attr import IntegratedGradients  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_xai import XAIMixin  # noqa: E402
from lightning_xai.callbacks import ExplanationPenalty  # noqa: E402
from lightning_xai.datasets import LengthBucketSampler, SSTShortcut  # noqa: E402
from lightning_xai.visualization import render_tokens_png  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers|litlogger).*")

#: the callback's arguments per method; "vanilla" and "no shortcut" train without a penalty
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "cdep": {"method": "cdep", "cdep_variant": "text"},
    "rrr": {"method": "rrr"},
    # RRR's first-order variant: the same penalty, a finite-difference parameter gradient, no double backward
    "rrr_finite_difference": {"method": "rrr", "differentiation": "finite_difference"},
    "expected_gradients": {"method": "expected_gradients"},
    "ablation": {"method": "ablation"},
    "counterexamples": {"method": "counterexamples"},
    "rrr_gradcam": {"method": "rrr_gradcam", "layer": "lstm"},
}
#: the weights tried on dev, seed 0: two decades of each method's documented range (a CPU-sized grid; --grid widens it)
WEIGHT_GRIDS: dict[str, tuple[float, ...]] = {
    "cdep": (1.0, 10.0),
    "rrr": (100.0, 1000.0),
    "rrr_finite_difference": (100.0, 1000.0),
    "expected_gradients": (10.0, 100.0),
    "ablation": (1.0, 10.0),
    "counterexamples": (1.0,),
    "rrr_gradcam": (1.0, 10.0),
}
CEILING = "no shortcut"
#: CDEP paper, Table 4 (GloVe embeddings, test accuracy %): unpenalized and CDEP
PAPER = {
    "decoy": {"vanilla": "56.6 ± 5.8", "cdep": "75.4 ± 0.9"},
    "articles": {"vanilla": "57.8 ± 0.8", "cdep": "68.2 ± 0.8"},
    "gender": {"vanilla": "64.2 ± 3.1", "cdep": "78.0 ± 3.0"},
}
#: epochs, and dev checks per epoch: the phrase variants train on ~99k phrases, 14x the decoy's sentences
SCHEDULES = {"decoy": (4, 1.0), "articles": (1, 0.25), "gender": (1, 0.25)}


class SentenceClassifier(XAIMixin, pl.LightningModule):
    """The training of every SST classifier of the examples: cross-entropy, dev accuracy, Adam at ``hparams.lr``."""

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["input_ids"]), batch["labels"])
        self.log("train/loss", loss, on_epoch=True, on_step=False, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, batch_idx):
        correct = (self(batch["input_ids"]).argmax(1) == batch["labels"]).float().mean()
        self.log("val/acc", correct, on_epoch=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class SSTClassifier(SentenceClassifier):
    """Embedding, one LSTM layer and a linear head on the last state (inputs are padded on the left)."""

    def __init__(self, vocabulary_size: int, embedding_dim: int = 300, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocabulary_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.xai_forward_from_embeddings(self.embedding(input_ids), {})

    def xai_embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def xai_forward_from_embeddings(self, embeddings: torch.Tensor, batch: Any) -> torch.Tensor:
        states, _ = self.lstm(embeddings)
        return self.head(states[:, -1])


class KeepBestOnDev(pl.Callback):
    """Keeps the weights of the best dev accuracy seen (in memory) and restores them when fitting ends."""

    def __init__(self) -> None:
        self.best, self.state = -1.0, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = float(trainer.callback_metrics["val/acc"])
        if not trainer.sanity_checking and accuracy > self.best:
            self.best, self.state = accuracy, copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


def _loader(dataset: SSTShortcut, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=LengthBucketSampler(dataset, batch_size, seed), collate_fn=SSTShortcut.collate
    )


def _planted_subset(train: SSTShortcut, limit: int) -> SSTShortcut:
    subset = copy.copy(train)
    subset.examples = [example for example in train.examples if example[2] is not None][:limit]
    return subset


@torch.no_grad()
def accuracy(model: nn.Module, dataset: SSTShortcut) -> float:
    model.eval()
    correct = 0
    for batch in _loader(dataset, 512):
        correct += int((model(batch["input_ids"]).argmax(1) == batch["labels"]).sum())
    return 100.0 * correct / max(1, len(dataset))


class Experiment:
    """The splits of one variant and the runs trained on them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.train = {shortcut: SSTShortcut(args.data, "train", args.variant, shortcut) for shortcut in (True, False)}
        self.splits = {
            shortcut: {
                split: SSTShortcut(args.data, split, args.variant, vocabulary=self.train[shortcut].vocabulary)
                for split in ("dev", "test")
            }
            for shortcut in (True, False)
        }
        planted = _planted_subset(self.train[True], args.reliance_samples)
        self.reliance = (planted, planted.shortcut_swapped())
        self.runs: list[dict[str, Any]] = []

    def run(self, method: str, weight: float | None, seed: int) -> tuple[dict[str, Any], SSTClassifier]:
        args = self.args
        shortcut = method != CEILING
        train, splits = self.train[shortcut], self.splits[shortcut]
        epochs, checks = (args.epochs, 1.0) if args.epochs else SCHEDULES[args.variant]
        pl.seed_everything(seed, verbose=False)
        model = SSTClassifier(len(train.vocabulary))
        keep = KeepBestOnDev()
        callbacks: list[pl.Callback] = [keep]
        if weight is not None:
            callbacks.append(ExplanationPenalty(weight=weight, seed=seed, **METHODS[method]))
        label = method.replace(" ", "_") + ("" if weight is None else f"_w{weight:g}")
        trainer = pl.Trainer(
            max_epochs=epochs,
            val_check_interval=checks,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(args.output_dir / "csv", name=f"{label}/seed{seed}", version=""),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        started = time.perf_counter()
        trainer.fit(model, _loader(train, args.batch_size, seed), _loader(splits["dev"], 512))
        seconds = time.perf_counter() - started
        planted, swapped = self.reliance
        result = {
            "method": method,
            "weight": weight,
            "seed": seed,
            "dev": keep.best * 100,
            "test": accuracy(model, splits["test"]),
            "planted_train": accuracy(model, planted) if shortcut else None,
            "swapped_train": accuracy(model, swapped) if shortcut else None,
            "seconds": seconds,
        }
        self.runs.append(result)
        return result, model


def _summary(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def _attribution_picture(
    models: dict[str, SSTClassifier], experiment: Experiment, path: Path, count: int = 4, steps: int = 16
) -> None:
    """Integrated Gradients of the true class per token (summed over the embedding) on planted training samples."""
    planted = experiment.reliance[0]
    by_label = {label: [i for i, example in enumerate(planted.examples) if example[1] == label] for label in (0, 1)}
    samples = [planted[i] for label in (1, 0) for i in by_label[label][: count // 2]]
    batch = SSTShortcut.collate(samples)
    ids = batch["input_ids"]
    figure, axes = plt.subplots(len(models), 1, figsize=(9, 1.0 + 1.45 * count * len(models) / 2), squeeze=False)
    for axis, (method, model) in zip(axes[:, 0], models.items()):
        model.eval()
        embeddings = model.xai_embed(ids).detach()
        explain = IntegratedGradients(lambda e, model=model: model.xai_forward_from_embeddings(e, {}))
        scores = explain.attribute(embeddings, target=batch["labels"], n_steps=steps).sum(-1).detach()
        tokens, values = [], []
        for row, sample in enumerate(samples):
            start = ids.shape[1] - len(sample["input_ids"])
            words = planted.vocabulary.decode(ids[row, start:].tolist())
            ((position, _),) = sample["mask"]
            words[position] = f"[{words[position]}]"
            label = "pos" if int(batch["labels"][row]) else "neg"
            tokens.append([f"{label}:", *words])
            values.append([0.0, *scores[row, start:].tolist()])
        axis.imshow(render_tokens_png(tokens, values, width_px=900))
        axis.set_title(f"{method}: Integrated Gradients of the true class (red +, blue -; [planted word])", fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _parse_grids(entries: Sequence[str]) -> dict[str, tuple[float, ...]]:
    grids = dict(WEIGHT_GRIDS)
    for entry in entries:
        method, _, weights = entry.partition("=")
        if method not in WEIGHT_GRIDS or not weights:
            raise SystemExit(f"--grid takes METHOD=W1,W2,... with METHOD in {tuple(WEIGHT_GRIDS)}, got {entry!r}")
        grids[method] = tuple(float(w) for w in weights.split(","))
    return grids


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="directory of SST's train/dev/test.txt PTB trees")
    parser.add_argument("--variant", choices=("decoy", "articles", "gender"), default="decoy")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/sst_<variant>")
    parser.add_argument("--methods", nargs="+", default=[*METHODS, CEILING], choices=[*METHODS, CEILING])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=0, help="0: the variant's schedule (decoy 4, phrases 1)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--grid", nargs="*", default=[], metavar="METHOD=W1,W2", help="replace a weight grid")
    parser.add_argument("--reliance-samples", type=int, default=2000, help="planted training samples swapped")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or Path(f"outputs/sst_{args.variant}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    grids = _parse_grids(args.grid)
    console = Console(width=max(110, Console().width))
    experiment = Experiment(args)
    console.print(
        f"SST {args.variant}: {len(experiment.train[True])} training samples "
        f"({len(experiment.reliance[0])} planted ones checked for reliance), "
        f"dev {len(experiment.splits[True]['dev'])}, test {len(experiment.splits[True]['test'])}"
    )

    chosen: dict[str, float | None] = {}
    selection: dict[str, dict[float, float]] = {}
    first_models: dict[str, SSTClassifier] = {}
    for method in args.methods:
        if method in WEIGHT_GRIDS:
            selection[method] = {}
            best = None
            for weight in grids[method]:
                result, model = experiment.run(method, weight, 0)
                selection[method][weight] = result["dev"]
                console.print(f"  {method} weight {weight:g}: dev {result['dev']:.1f} (seed 0)")
                if best is None or result["dev"] > best[0]:
                    best = (result["dev"], weight, model)
            assert best is not None
            chosen[method], first_models[method] = best[1], best[2]
        else:
            chosen[method] = None
            _, first_models[method] = experiment.run(method, None, 0)
        for seed in range(1, args.seeds):
            experiment.run(method, chosen[method], seed)
        console.print(f"{method}: done")

    (args.output_dir / "runs.json").write_text(json.dumps(experiment.runs, indent=1))
    table = Table(title=f"SST {args.variant}: test accuracy (%), mean ± std over {args.seeds} seeds")
    columns = ("method", "weight", "dev", "test", "per seed", "planted train", "swapped", "s / run", "paper")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for method in args.methods:
        runs = [r for r in experiment.runs if r["method"] == method and r["weight"] == chosen[method]]
        reliance = [r for r in runs if r["swapped_train"] is not None]
        table.add_row(
            method,
            "-" if chosen[method] is None else f"{chosen[method]:g}",
            _summary([r["dev"] for r in runs]),
            _summary([r["test"] for r in runs]),
            " ".join(f"{r['test']:.1f}" for r in runs),
            _summary([r["planted_train"] for r in reliance]) if reliance else "-",
            _summary([r["swapped_train"] for r in reliance]) if reliance else "-",
            f"{statistics.mean(r['seconds'] for r in runs):.0f}",
            PAPER[args.variant].get(method, ""),
        )
    console.print(table)
    grid_table = Table(title="Weight selection: dev accuracy (%) per weight, seed 0", min_width=60)
    grid_table.add_column("method")
    grid_table.add_column("weight: dev accuracy")
    for method, scores in selection.items():
        grid_table.add_row(method, "   ".join(f"{w:g}: {a:.1f}" for w, a in scores.items()))
    if selection:
        console.print(grid_table)
    pictured = {m: first_models[m] for m in args.methods if m != CEILING}
    picture = args.output_dir / "attributions.png"
    if pictured:
        _attribution_picture(pictured, experiment, picture)
    console.print(f"Runs: {args.output_dir / 'runs.json'}   Logs: {args.output_dir / 'csv'}   Picture: {picture}")
    return {"runs": experiment.runs, "chosen": chosen}


if __name__ == "__main__":
    main()
