"""What GenerationAttributionReport costs, as a share of an epoch of training a tiny GPT-2, and what batching saves.

1. An epoch of fine-tuning the example's GPT-2 (2 layers, 32 dimensions) on ``PlantedAssociation(2000)`` at
   batch 32 without the report, and the report's own time at the end of each validation epoch over ``--epochs``
   epochs (so pictures, drawn on the first computation and every ``pictures_every_n_epochs``, are amortized as in
   a run): default settings on the example's 6 probe prompts, without and with pictures every epoch, and the
   heavier settings of the example's token report (two methods, three metrics). The share is the report's time
   per epoch over the epoch's.
2. FeatureAblation of the same prompts: our batched single pass against Captum's ``LLMAttribution`` per prompt,
   with ``forward_in_tokens=False`` (the same numbers) and with Captum's default (token by token, cached).

Each figure is the minimum of ``--repeats`` runs in one process (ratios in the same run).

    python benchmarks/generation_report_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_xai.attribution.generation import attribute_generation
from lightning_xai.callbacks import GenerationAttributionReport
from lightning_xai.datasets import PlantedAssociation

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class CausalLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: object) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=5e-3)


def tiny_gpt2(tokenizer: object) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return GPT2LMHeadModel(config)


class TimedReport(GenerationAttributionReport):
    """The report, timing its own end-of-epoch work (generation, attribution, metrics, pictures)."""

    seconds = 0.0

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        start = time.perf_counter()
        super().epoch_end(trainer, pl_module, stage)
        self.seconds += time.perf_counter() - start


def epoch_seconds(corpus: PlantedAssociation, callbacks: list, epochs: int) -> float:
    module = CausalLM(tiny_gpt2(corpus.tokenizer).train(), corpus.tokenizer)
    logger = pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="generation_report_cost_"))  # pictures need a logger
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, limit_val_batches=1)  # fmt: skip
    validation = DataLoader(PlantedAssociation(num_sentences=8, seed=1, tokenizer=corpus.tokenizer), batch_size=8)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(corpus, batch_size=32, shuffle=True), validation)
    return (time.perf_counter() - start) / epochs


def best(repeats: int, fn: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run: pictures are amortized over them")
    args = parser.parse_args(argv)
    corpus = PlantedAssociation(num_sentences=args.sentences, seed=0)
    prompts = corpus.probe_prompts()
    settings = {
        "default (pictures every 10 epochs)": lambda: [TimedReport(prompts)],
        "no pictures": lambda: [TimedReport(prompts, pictures_every_n_epochs=0)],
        "pictures every epoch": lambda: [TimedReport(prompts, pictures_every_n_epochs=1)],
        "two methods (FA + LIG), 3 metrics": lambda: [
            TimedReport(
                prompts, targets=[" nurse"] * len(prompts), methods=["feature_ablation", "layer_integrated_gradients"],
                metrics=["comprehensiveness", "sufficiency", "deletion_auc"], pictures_every_n_epochs=0,
                method_kwargs={"layer_integrated_gradients": {"n_steps": 16}},
            )
        ],
    }  # fmt: skip
    vanilla = min(epoch_seconds(corpus, [], args.epochs) for _ in range(args.repeats))
    rows = {"vanilla epoch (s)": vanilla}
    print(f"epoch of fine-tuning, {args.sentences} sentences at batch 32: {vanilla:.2f} s")
    print(f"{'report (6 prompts), per epoch':<36} {'report (ms)':>11} {'share of the epoch':>18}")
    for label, make in settings.items():
        seconds = []
        for _ in range(args.repeats):
            callbacks = make()
            epoch_seconds(corpus, callbacks, args.epochs)
            seconds.append(callbacks[0].seconds / args.epochs)
        rows[f"{label} share"] = min(seconds) / vanilla
        print(f"{label:<36} {1000 * min(seconds):>11.1f} {100 * min(seconds) / vanilla:>17.1f} %")

    model = tiny_gpt2(corpus.tokenizer).eval()
    tokenizer = corpus.tokenizer
    targets = [" nurse ."] * len(prompts)

    def captum(**kwargs: object) -> None:
        for prompt, target in zip(prompts, targets):
            inp = TextTokenInput(prompt, tokenizer, baselines=tokenizer.pad_token_id)
            LLMAttribution(FeatureAblation(model), tokenizer).attribute(inp, target=target, **kwargs)

    ours = best(args.repeats, lambda: attribute_generation(model, tokenizer, prompts, targets))
    single_pass = best(args.repeats, lambda: captum(forward_in_tokens=False))
    cached = best(args.repeats, lambda: captum())
    print(f"\nFeatureAblation of {len(prompts)} prompts (2 target tokens):")
    print(f"  batched (lightning_xai)                  {1000 * ours:8.1f} ms")
    print(f"  Captum per prompt, forward_in_tokens=False {1000 * single_pass:6.1f} ms  ({single_pass / ours:.1f}x)")
    print(f"  Captum per prompt, default (cached)      {1000 * cached:8.1f} ms  ({cached / ours:.1f}x)")
    rows.update(
        {"batched ms": 1000 * ours, "captum single pass x": single_pass / ours, "captum cached x": cached / ours}
    )
    return rows


if __name__ == "__main__":
    main()
