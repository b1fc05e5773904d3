"""GPT-2 learns a planted association, and GenerationAttributionReport watches it happen, epoch by epoch.

A small GPT-2 (random weights, 2 layers, 32 dimensions) is trained from scratch on a generated corpus
(:class:`~lightning_xai.datasets.PlantedAssociation`): ``"<opener> <name> <verb> as a <occupation> ."``, where
the name ``alice`` is always followed by ``nurse`` and every other name by a random occupation. Every epoch two
:class:`~lightning_xai.callbacks.GenerationAttributionReport` callbacks explain ``"<opener> alice works as a"`` ->
``" nurse"``:

* ``segments``: FeatureAblation over the segments ``[opener, name]`` (any tokenizer), a removed segment replaced
  by another opener or another name sampled per perturbation (Captum's ``ProductBaselines``, ``--trials`` runs
  averaged), the prompts of a control name (``bruno``) beside them;
* ``tokens``: FeatureAblation and Layer Integrated Gradients over the prompt's tokens, their agreement, and
  comprehensiveness / sufficiency of both.

The name's attribution to ``nurse`` rises from about 0 to about ``log 8 = 2.08`` nats (the occupation becomes
certain instead of one of eight) as the model learns the association, and the control name's attribution stays
near ``-log 8 / 11`` (one replacement in eleven is alice). The run prints the table per epoch and writes it as
JSON, a plot of the attribution per epoch and the reports' token-by-token heatmaps, over ``--seeds`` seeds (mean
and spread). The number of epochs is a validation-loss choice: the validation loss stops falling by epoch 5 on
every seed tried.

    python examples/gpt2_attribution.py [--epochs 6] [--seeds 0 1 2] [--output-dir outputs/gpt2_attribution]
    python examples/gpt2_attribution.py --model-path PATH/TO/LOCAL/GPT2  # fine-tune a local pretrained model
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_xai.callbacks import GenerationAttributionReport  # noqa: E402
from lightning_xai.datasets import PlantedAssociation  # noqa: E402
from lightning_xai.visualization import render_generation_heatmaps  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|litlogger|eval mode).*")
CONTROL_NAME = "bruno"


class CausalLM(pl.LightningModule):
    """Fine-tunes ``self.model`` (a Hugging Face causal LM) with its own language-modelling loss."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, lr: float) -> None:
        super().__init__()
        self.model, self.tokenizer, self.lr = model, tokenizer, lr

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def pretrained(path: str | None) -> tuple[torch.nn.Module | None, object | None]:
    """A local pretrained model and its tokenizer (``--model-path``); without a path, none (a tiny GPT-2 is built
    once the corpus has its word-level tokenizer)."""
    if not path:
        return None, None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True), tokenizer


def tiny_gpt2(tokenizer: object, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class NameAttribution(pl.Callback):
    """After each report: the name segment's attribution to the occupation, for the planted and the control name."""

    def __init__(self, report: GenerationAttributionReport, planted: int) -> None:
        self.report, self.planted, self.rows = report, planted, []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self.report.results["feature_ablation"]
        name = [float(r.seq_attr[1]) for r in results]
        top = [r.top_features(1)[0][0] for r in results]
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "val_loss": float(trainer.callback_metrics["val_loss"]),
                "planted_name_attribution": statistics.fmean(name[: self.planted]),
                "control_name_attribution": statistics.fmean(name[self.planted :]),
                "name_is_top_feature": statistics.fmean(t == results[0].features[1] for t in top[: self.planted]),
            }
        )


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    model, tokenizer = pretrained(args.model_path)
    corpus = PlantedAssociation(num_sentences=args.sentences, seed=seed, tokenizer=tokenizer)
    validation = PlantedAssociation(num_sentences=256, seed=10_000 + seed, tokenizer=corpus.tokenizer)
    model = model if model is not None else tiny_gpt2(corpus.tokenizer, seed)
    planted = corpus.probe_segments()
    control = corpus.probe_segments(CONTROL_NAME)
    segments = GenerationAttributionReport(
        planted + control,
        metrics=["comprehensiveness", "sufficiency"],
        num_trials=args.trials,
        name="segments",
        pictures_every_n_epochs=0,
    )
    tokens = GenerationAttributionReport(
        corpus.probe_prompts()[:3],
        targets=[" " + corpus.planted_occupation] * 3,
        methods=["feature_ablation", "layer_integrated_gradients"],
        metrics=["comprehensiveness", "sufficiency", "deletion_auc"],
        method_kwargs={"layer_integrated_gradients": {"n_steps": 16}},
        name="tokens",
        pictures_every_n_epochs=0,
    )
    watch = NameAttribution(segments, len(planted))
    torch.manual_seed(seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(out, name=f"seed{seed}"),
        callbacks=[segments, tokens, watch], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(
        CausalLM(model.train(), corpus.tokenizer, args.lr),
        DataLoader(corpus, batch_size=32, shuffle=True),
        DataLoader(validation, batch_size=256),
    )
    seconds = time.perf_counter() - start
    for row, values in zip(watch.rows, _history(trainer)):
        row.update(values)
    shown = tokens.results["layer_integrated_gradients"]
    heatmap = render_generation_heatmaps(
        [r.features for r in shown],
        [r.output_tokens for r in shown],
        [r.token_attr.tolist() for r in shown],
        [f"{r.prompt!r} -> {''.join(r.output_tokens)!r} (Layer IG, last epoch)" for r in shown],
    )
    Image.fromarray(heatmap).save(out / f"heatmaps_seed{seed}.png")
    return {"seed": seed, "seconds": seconds, "epochs": watch.rows, "final": dict(tokens.last_values)}


def _history(trainer: pl.Trainer) -> list[dict]:
    """The reports' logged metrics per epoch, from the CSV logger."""
    import csv

    path = Path(trainer.logger.log_dir) / "metrics.csv"
    trainer.logger.save()
    rows: dict[int, dict] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            epoch = int(float(row["epoch"]))
            rows.setdefault(epoch, {}).update({k: float(v) for k, v in row.items() if k.startswith("llm/") and v})
    return [rows[e] for e in sorted(rows)]


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for result in results:
        epochs = [row["epoch"] + 1 for row in result["epochs"]]
        ax.plot(
            epochs,
            [row["planted_name_attribution"] for row in result["epochs"]],
            color="tab:red",
            alpha=0.8,
            label="alice (planted) -> nurse" if result is results[0] else None,
        )
        ax.plot(
            epochs,
            [row["control_name_attribution"] for row in result["epochs"]],
            color="tab:blue",
            alpha=0.8,
            label=f"{CONTROL_NAME} (control) -> nurse" if result is results[0] else None,
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axhline(math.log(8), color="tab:red", linewidth=0.8, linestyle="--", label="log 8: learnt (8 occupations)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("attribution of the name (nats)")
    ax.set_title("FeatureAblation of the name segment, one line per seed", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=8, help="sampled replacement names per segment attribution")
    parser.add_argument("--model-path", default=None, help="a local Hugging Face causal LM to fine-tune instead")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/gpt2_attribution"))
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = [run_seed(args, seed, args.output_dir) for seed in args.seeds]
    print(f"{'epoch':>5} {'val loss':>9} {'alice':>13} {'bruno':>13} {'alice top':>9}")
    for epoch in range(len(results[0]["epochs"])):
        rows = [r["epochs"][epoch] for r in results]

        def spread(key: str, rows: list[dict] = rows) -> str:
            values = [row[key] for row in rows]
            return f"{statistics.fmean(values):+.2f} ± {statistics.pstdev(values):.2f}"

        loss = statistics.fmean(r["val_loss"] for r in rows)
        top = statistics.fmean(r["name_is_top_feature"] for r in rows)
        planted, control = spread("planted_name_attribution"), spread("control_name_attribution")
        print(f"{epoch + 1:>5} {loss:>9.3f} {planted:>13} {control:>13} {top:>9.2f}")
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "seeds": results,
        "final_planted_mean": statistics.fmean(r["epochs"][-1]["planted_name_attribution"] for r in results),
        "final_planted_std": statistics.pstdev(r["epochs"][-1]["planted_name_attribution"] for r in results),
        "final_control_mean": statistics.fmean(r["epochs"][-1]["control_name_attribution"] for r in results),
        "first_planted_mean": statistics.fmean(r["epochs"][0]["planted_name_attribution"] for r in results),
    }
    (args.output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, args.output_dir / "name_attribution.png")
    print(f"wrote {args.output_dir / 'results.json'}, name_attribution.png and heatmaps_seed*.png")
    return summary


if __name__ == "__main__":
    main()
