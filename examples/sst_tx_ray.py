"""TX-Ray on SST: what a text CNN's filters respond to, how training moves them, and pruning by it.

A Kim-style CNN (random embeddings, filters of width 3 and 5, ReLU, max-over-time pooling) is trained on the
binary Stanford Sentiment Treebank with :class:`~lightning_xai.callbacks.NeuronMonitor` on both convolutions. The
monitor's probe set is a fixed sample of *training* sentences, so that the pruning scores never look at the dev
sentences pruning is judged on. Every epoch it logs how far each filter's token distribution moved (Hellinger
distance to the previous epoch and to the random initialisation), the share of dead filters, the filters' lengths
and their overlap; the kept model is the epoch of best dev accuracy.

Then the filters of both layers are pruned inline (their outputs set to 0, and each pruned filter's mean
contribution on the training probe moved into the head's bias; no retraining), the same share of each layer, by

* ``tx-ray mass``: the filter's share of the layer's maximal activation on the training probe (TX-Ray's relevance;
  low: task-irrelevant), credited by TX-Ray's max-1 (each token to its most activated filter) or by the lab's
  top-1 per filter (each filter's strongest token per sentence: what max-over-time pooling passes on); two
  monitors with different names on one model;
* ``tx-ray class selectivity``: a third monitor takes the sentence's label as every token's feature, so each
  filter is a distribution over the two classes; the score is its Hellinger distance to the whole layer's
  (a filter that fires alike on both classes tells the classifier nothing);
* ``tx-ray transfer``: the Hellinger distance of its token distribution to the initialisation's (low: training
  left it where it started);
* ``magnitude``: the L2 norm of the filter's weights (the usual structured-pruning baseline);
* ``random``: a random draw (the mean over three draws per run);
* ``reverse mass``: the highest-mass filters first (a check that the score carries information).

Dev accuracy per sparsity (mean ± std over seeds) is the table and the plot; the sparsity each method keeps is
the one of best dev accuracy (seed by seed), and its test accuracy is reported beside the unpruned model's: the
TX-Ray abstract's claim that pruning can improve generalisation, measured.

Run ``python examples/sst_tx_ray.py --data PATH`` (PATH holds SST's ``train.txt``, ``dev.txt``, ``test.txt``) or
``--help``; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst_decoy import KeepBestOnDev, SentenceClassifier, _loader, accuracy  # noqa: E402

from lightning_xai.callbacks import NeuronMonitor  # noqa: E402
from lightning_xai.datasets import SSTShortcut  # noqa: E402
from lightning_xai.functional.neurons import lowest_scored, prune_neurons  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers|litlogger).*")

LAYERS = ("conv3", "conv5")
SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RANDOM_DRAWS = 3


class TextCNN(SentenceClassifier):
    """Embedding, two convolutions (widths 3 and 5, same padding), ReLU, max over the real tokens, a linear head."""

    def __init__(self, vocabulary_size: int, embedding_dim: int = 64, filters: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocabulary_size, embedding_dim, padding_idx=0)
        self.conv3 = nn.Conv1d(embedding_dim, filters, 3, padding=1)
        self.conv5 = nn.Conv1d(embedding_dim, filters, 5, padding=2)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(2 * filters, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids)))

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The filters' maxima over each sentence's real tokens, ``(batch, 2 * filters)``."""
        embedded = self.embedding(input_ids).transpose(1, 2)
        padding = (input_ids == 0)[:, None, :]
        # ReLU outputs are >= 0, so 0 at the padding never wins the max over a sentence's real tokens
        return torch.cat([F.relu(conv(embedded)).masked_fill(padding, 0.0).amax(-1) for conv in self.convs], dim=1)

    @property
    def convs(self) -> tuple[nn.Conv1d, nn.Conv1d]:
        return (self.conv3, self.conv5)


class ProbeDataset(torch.utils.data.Dataset):
    """A fixed sample of training sentences, padded together (one length per probe batch)."""

    def __init__(self, train: SSTShortcut, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(train), generator=generator)[:size].tolist()
        self.samples = [train[i] for i in sorted(chosen, key=lambda i: len(train.examples[i][0]))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def _probe_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = SSTShortcut.collate(samples)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "valid": batch["input_ids"] != 0}


# score name -> (monitors, model, layer, generator) -> per-filter importance (higher: keep)
Score = Callable[[dict[str, NeuronMonitor], TextCNN, str, torch.Generator], torch.Tensor]


def _tx_ray(monitor: str, score: str, sign: float = 1.0) -> Score:
    return lambda monitors, model, layer, generator: sign * monitors[monitor].scores(layer, score)


def _magnitude(monitors: dict[str, NeuronMonitor], model: TextCNN, layer: str, generator: torch.Generator):
    return getattr(model, layer).weight.detach().flatten(1).norm(dim=1)


def _random(monitors: dict[str, NeuronMonitor], model: TextCNN, layer: str, generator: torch.Generator):
    return torch.rand(getattr(model, layer).out_channels, generator=generator)


SCORES: dict[str, Score] = {
    "tx-ray class selectivity": _tx_ray("labels", "selectivity"),
    "tx-ray mass, top-1": _tx_ray("top1", "mass"),
    "tx-ray mass, max-1": _tx_ray("max1", "mass"),
    "tx-ray transfer, top-1": _tx_ray("top1", "transfer"),
    "magnitude": _magnitude,
    "random": _random,
    "reverse mass, top-1": _tx_ray("top1", "mass", -1.0),
}
#: the two credit rules: TX-Ray's max-1 over all filters, and the lab's top-1 per filter (what max-pooling passes on)
MONITORS = {
    "top1": {"mode": "topk", "k": 1},
    "max1": {"mode": "max"},
    # the sentence's label as every token's feature: each filter's distribution over the classes
    "labels": {
        "mode": "topk",
        "k": 1,
        "feature_key": "target",
        "num_features": 2,
        "feature_names": ["negative", "positive"],
    },
}


@torch.no_grad()
def mean_pooled(model: TextCNN, probe: ProbeDataset) -> torch.Tensor:
    """Each filter's mean pooled output over the (training) probe sentences."""
    model.eval()
    batches = torch.utils.data.DataLoader(probe, batch_size=256, collate_fn=_probe_collate)
    return torch.cat([model.pooled(batch["input_ids"]) for batch in batches]).mean(0)


def pruned_accuracy(
    model: TextCNN,
    scores: dict[str, torch.Tensor],
    sparsity: float,
    means: torch.Tensor,
    datasets: Sequence[SSTShortcut],
) -> list[float]:
    """Accuracies on ``datasets`` with the ``sparsity`` lowest-scored filters of every layer silenced.

    A silenced filter's mean contribution to the logits moves into the head's bias (``means``: its mean pooled
    output on the training probe), so that pruning a filter that fires alike on every sentence is free, as
    fine-tuning the head after pruning would make it; every score gets the same compensation.
    """
    pruned = {layer: lowest_scored(scores[layer], sparsity) for layer in LAYERS}
    handles = [prune_neurons(getattr(model, layer), neurons) for layer, neurons in pruned.items() if neurons.numel()]
    offsets = torch.cat([neurons + i * model.conv3.out_channels for i, neurons in enumerate(pruned.values())])
    bias = model.head.bias.detach().clone()
    model.head.bias.data += model.head.weight.detach()[:, offsets] @ means[offsets]
    try:
        return [accuracy(model, dataset) for dataset in datasets]
    finally:
        model.head.bias.data.copy_(bias)
        for handle in handles:
            handle.remove()


def run(args: argparse.Namespace, splits: dict[str, SSTShortcut], seed: int) -> dict[str, Any]:
    """Trains one seed with the monitor and prunes its kept model by every score at every sparsity."""
    pl.seed_everything(seed, workers=True)
    train = splits["train"]
    model = TextCNN(len(train.vocabulary), args.embedding_dim, args.filters, args.lr)
    probe = ProbeDataset(train, args.probe, seed)
    monitors = {
        name: NeuronMonitor(
            list(LAYERS),
            valid_key="valid",  # the padding is credited to nothing
            num_samples=len(probe),
            batch_size=256,
            dataset=probe,
            collate_fn=_probe_collate,
            pictures_every_n_epochs=args.epochs if seed == args.seeds[0] else 0,
            name=name,
            **{"feature_names": train.vocabulary.itos, **options},
        )
        for name, options in MONITORS.items()
    }
    keep = KeepBestOnDev()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[*monitors.values(), keep],
        logger=CSVLogger(args.output_dir, name=f"seed{seed}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=args.limit_batches,
        deterministic=True,
    )
    trainer.fit(model, _loader(train, args.batch_size, seed), _loader(splits["dev"], 512))
    history = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("neurons/")}
    for monitor in monitors.values():
        monitor.measure(trainer, model)  # the counts of the kept (best-dev) weights score the filters
    means = mean_pooled(model, probe)
    generator = torch.Generator().manual_seed(seed)
    curves: dict[str, list[list[float]]] = {}
    for name, score in SCORES.items():
        draws = RANDOM_DRAWS if name == "random" else 1
        per_draw = []
        for _ in range(draws):
            scores = {layer: score(monitors, model, layer, generator) for layer in LAYERS}
            per_draw.append(
                [pruned_accuracy(model, scores, s, means, [splits["dev"], splits["test"]]) for s in args.sparsities]
            )
        # mean over the random draws: [sparsity] -> [dev, test]
        curves[name] = [
            [statistics.fmean(d[i][j] for d in per_draw) for j in range(2)] for i in range(len(args.sparsities))
        ]
    return {"seed": seed, "best_dev": keep.best, "monitor": history, "curves": curves}


def _summary(values: Sequence[float]) -> str:
    return (
        f"{statistics.fmean(values):.1f} ± {statistics.pstdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"
    )


def summarise(runs: list[dict[str, Any]], sparsities: Sequence[float]) -> dict[str, Any]:
    """Dev accuracy per sparsity and method; the dev-chosen sparsity's test accuracy per method."""
    dev = {name: [[r["curves"][name][i][0] for r in runs] for i in range(len(sparsities))] for name in SCORES}
    chosen = {}
    for name in SCORES:
        tests, picks, unpruned = [], [], []
        for r in runs:
            curve = r["curves"][name]
            best = max(range(len(sparsities)), key=lambda i: (curve[i][0], -i))  # ties: the smaller sparsity
            picks.append(sparsities[best])
            tests.append(curve[best][1])
            unpruned.append(curve[0][1])
        chosen[name] = {"sparsity": picks, "test": tests, "unpruned_test": unpruned}
    return {"dev": dev, "chosen": chosen}


def plot(summary: dict[str, Any], sparsities: Sequence[float], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name, per_sparsity in summary["dev"].items():
        means = [statistics.fmean(v) for v in per_sparsity]
        spreads = [statistics.pstdev(v) if len(v) > 1 else 0.0 for v in per_sparsity]
        axis.plot(sparsities, means, marker="o", label=name)
        axis.fill_between(
            sparsities, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)], alpha=0.08
        )
    axis.set_xlabel("share of filters pruned in each layer (no retraining)")
    axis.set_ylabel("dev accuracy (%)")
    axis.set_title("SST text CNN: pruning by TX-Ray scores vs magnitude and random (mean ± std over seeds)", fontsize=8)
    axis.axhline(50.0, color="grey", linewidth=0.6, linestyle=":")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst"), help="folder of SST's PTB trees")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/sst_tx_ray"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="the kept epoch is the best on dev")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--filters", type=int, default=64, help="filters per width")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe", type=int, default=2000, help="training sentences in the monitor's probe set")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--limit-batches", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="one seed, two epochs, four sparsities")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.probe, args.sparsities = [0], 2, 256, [0.0, 0.25, 0.5, 0.75]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _arguments(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = SSTShortcut(args.data, "train", "decoy", shortcut=False)
    splits = {
        "train": train,
        "dev": SSTShortcut(args.data, "dev", "decoy", vocabulary=train.vocabulary),
        "test": SSTShortcut(args.data, "test", "decoy", vocabulary=train.vocabulary),
    }
    runs = [run(args, splits, seed) for seed in args.seeds]
    summary = summarise(runs, args.sparsities)
    plot(summary, args.sparsities, args.output_dir / "pruning.png")

    console = Console()
    table = Table(title=f"Dev accuracy (%) after pruning each layer's filters, {len(args.seeds)} seed(s)")
    table.add_column("score")
    for sparsity in args.sparsities:
        table.add_column(f"{sparsity:.0%}", justify="right")
    for name, per_sparsity in summary["dev"].items():
        table.add_row(name, *(_summary(v) for v in per_sparsity))
    console.print(table)
    chosen = Table(title="Sparsity chosen on dev per seed, and its test accuracy (%)")
    for column in ("score", "chosen sparsity", "test, pruned", "test, unpruned"):
        chosen.add_column(column)
    for name, entry in summary["chosen"].items():
        chosen.add_row(
            name,
            ", ".join(f"{s:.0%}" for s in entry["sparsity"]),
            _summary(entry["test"]),
            _summary(entry["unpruned_test"]),
        )
    console.print(chosen)
    monitor = {key: [r["monitor"].get(key, float("nan")) for r in runs] for key in runs[0]["monitor"]}
    monitor_table = Table(title="NeuronMonitor at the last epoch (mean ± std over seeds)")
    monitor_table.add_column("key")
    monitor_table.add_column("value", justify="right")
    for key, values in sorted(monitor.items()):
        monitor_table.add_row(key, f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}")
    console.print(monitor_table)
    result = {
        "runs": runs,
        "summary": summary,
        "sparsities": list(args.sparsities),
        "seconds": time.perf_counter() - started,
    }
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=1))
    console.print(f"{result['seconds']:.0f} s; plot: {args.output_dir / 'pruning.png'}")
    return result


if __name__ == "__main__":
    main()
