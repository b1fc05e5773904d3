"""Smooth surrogates on DecoyDigits: do Softplus and LogSumExp pooling make gradient explanations better?

Kokhlikyan et al. (2021, "Investigating sanity checks for saliency maps with image and text classification")
report that explaining a smoothed copy of a network (ReLU -> Softplus(beta), MaxPool -> LogSumExp pooling(tau))
lowers the infidelity and the max-sensitivity of gradient explanations, and that the input multiplier of
"global" Integrated Gradients (``(x - x') * mean path gradient``) carries the input's structure into the maps, so
that they still resemble the trained model's maps after its weights are randomized, where "local" IG (the mean
path gradient alone) does not. This script measures both on the DecoyDigits CNN of ``examples/decoy_digits.py``,
and then whether RRR trained through the surrogate's gradients removes the decoy better than RRR on the exact
gradients.

Part 1 (explanations). Per seed: the CNN is trained on the digits *without* the decoy patch (the typology's
ceiling model; Adam 1e-3, best validation epoch kept). The smoothing strength ``beta = tau`` is chosen on the
validation split, blind to the explanation metrics: the smoothest value of the grid whose surrogate keeps the
validation accuracy within one point of the model's. On ``--samples`` test images, for the model and for its
surrogate: Saliency (the target logit's input gradient), Input x Gradient, IG local and IG global (zero
baseline, ``--ig-steps`` Riemann steps); infidelity (Gaussian perturbations of std ``--noise``, scale-invariant
``normalize=True``), max-sensitivity (uniform radius ``--radius``), and the randomization sanity similarity (the
mean Spearman correlation of |attributions| of the trained model and of a copy with its top 1, or all 4,
parameterised layers re-initialised; lower passes the check). The surrogate's maps are scored twice for
infidelity: against the surrogate (the model they explain) and against the original model.

Part 2 (training). DecoyDigits with the decoy and the "correct" feedback mask (``--feedback``): RRR on the exact
input gradients vs RRR on the surrogate's (``ExplanationPenalty("rrr", surrogate={"relu_beta": b, "maxpool_tau":
b})``), weight chosen on validation with seed 0 from ``--rrr-weights``, then every seed; test accuracy %.

Run ``python examples/smooth_surrogates.py`` (``--quick`` for a smoke run; ``--help`` for the options).
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

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoy_digits import FEEDBACK, DigitsCNN, KeepBestOnValidation, Samples, feedback_masks  # noqa: E402

from lightning_xai.attribution import smooth_surrogate  # noqa: E402
from lightning_xai.callbacks import ExplanationPenalty  # noqa: E402
from lightning_xai.datasets import DecoyDigits  # noqa: E402
from lightning_xai.functional import (  # noqa: E402
    gaussian_perturbation,
    infidelity,
    randomize_top_layers,
    rank_correlation,
    sensitivity_max,
)

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers|litlogger).*")

#: smoothing strengths tried on validation (beta = tau), smoothest first
STRENGTHS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
#: the validation accuracy a surrogate may lose (points) and still be chosen
ACCURACY_TOLERANCE = 1.0
#: randomized top layers of the sanity check (the DigitsCNN has 4 parameterised layers)
RANDOMIZED_LAYERS = (1, 4)


# ----------------------------------------------------------------------------------------------- explanations


def _gradient(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """The input gradient of the target logit (signed: infidelity compares it with signed output changes)."""
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(model(inputs).gather(1, target[:, None]).sum(), inputs)
    return gradient


def _path_gradient(model: nn.Module, inputs: Tensor, target: Tensor, steps: int) -> Tensor:
    """The mean gradient on the straight path from 0 to ``inputs`` (midpoint Riemann sum): IG without ``x``."""
    return sum(_gradient(model, inputs * (step + 0.5) / steps, target) for step in range(steps)) / steps


def explainers(steps: int) -> dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    """Saliency, Input x Gradient, IG local and IG global (zero baseline): ``(model, x, target) -> map``."""
    return {
        "saliency": _gradient,
        "input_x_gradient": lambda model, x, t: x * _gradient(model, x, t),
        "ig_local": lambda model, x, t: _path_gradient(model, x, t, steps),
        "ig_global": lambda model, x, t: x * _path_gradient(model, x, t, steps),
    }


def _accuracy(model: nn.Module, images: Tensor, targets: Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(images).argmax(1) == targets).float().mean())


def choose_strength(model: nn.Module, images: Tensor, targets: Tensor) -> tuple[float, dict[float, float]]:
    """The smoothest beta = tau whose surrogate loses at most ACCURACY_TOLERANCE points of validation accuracy."""
    reference = _accuracy(model, images, targets)
    accuracies = {s: _accuracy(smooth_surrogate(model, s, s).eval(), images, targets) for s in STRENGTHS}
    chosen = next((s for s in STRENGTHS if accuracies[s] >= reference - ACCURACY_TOLERANCE), STRENGTHS[-1])
    return chosen, accuracies


def explanation_metrics(
    model: nn.Module, surrogate: nn.Module, images: Tensor, targets: Tensor, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    """``{"<method>/<model|surrogate>/<metric>": value}`` on the test images, means over the images."""
    results: dict[str, float] = {}
    for method, explain in explainers(args.ig_steps).items():
        for which, explained in (("model", model), ("surrogate", surrogate)):
            maps = explain(explained, images, targets)
            judges = {"infidelity": explained} if which == "model" else {"infidelity": surrogate}
            if which == "surrogate":
                judges["infidelity_vs_model"] = model
            for name, judge in judges.items():
                values = infidelity(
                    judge,
                    gaussian_perturbation(args.noise, generator=torch.Generator().manual_seed(seed)),
                    images,
                    maps,
                    targets,
                    n_perturb_samples=args.perturbations,
                    normalize=True,
                )
                results[f"{method}/{which}/{name}"] = float(values.mean())
            sensitivity = sensitivity_max(
                lambda x, t, explained=explained, explain=explain: explain(explained, x, t),
                images,
                targets,
                perturb_radius=args.radius,
                n_perturb_samples=args.perturbations,
                generator=torch.Generator().manual_seed(seed),
                explanations=maps,
            )
            results[f"{method}/{which}/sensitivity_max"] = float(sensitivity.mean())
            for layers in RANDOMIZED_LAYERS:
                randomized = randomize_top_layers(explained, layers, seed=seed)
                similarity = rank_correlation(maps, explain(randomized, images, targets))
                results[f"{method}/{which}/sanity_top{layers}"] = float(similarity.nanmean())
    return results


# ----------------------------------------------------------------------------------------------- training


def _digits_data(split: DecoyDigits, decoy: bool, feedback: str = "correct") -> Samples:
    images = split.images if decoy else split.images * (1 - split.masks)
    mask, relevant = feedback_masks(split, feedback)
    return Samples(images, split.targets, mask, relevant)


def train(
    splits: dict[str, DecoyDigits],
    args: argparse.Namespace,
    seed: int,
    decoy: bool,
    callbacks: Sequence[pl.Callback] = (),
) -> tuple[DigitsCNN, float, float]:
    """A DigitsCNN trained as in ``examples/decoy_digits.py``: ``(model, best validation %, seconds)``."""
    pl.seed_everything(seed, verbose=False)
    model = DigitsCNN()
    keep = KeepBestOnValidation()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[keep, *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=args.limit_batches,
    )
    started = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(
            _digits_data(splits["train"], decoy, args.feedback),
            batch_size=args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        ),
        # validation as in decoy_digits.py: with the (random) decoy for the decoy runs, without it otherwise
        DataLoader(_digits_data(splits["val"], decoy, args.feedback), batch_size=512),
    )
    return model.eval(), 100.0 * keep.best, time.perf_counter() - started


def rrr_callbacks(variant: str, weight: float, seed: int, strength: float) -> list[pl.Callback]:
    surrogate = {"relu_beta": strength, "maxpool_tau": strength} if variant == "surrogate" else None
    return [ExplanationPenalty("rrr", weight=weight, seed=seed, surrogate=surrogate)]


# ----------------------------------------------------------------------------------------------- tables


def _summary(values: Sequence[float], digits: int | None = None) -> str:
    """``mean ± std``: ``digits`` decimals, or 3 significant digits (infidelities span orders of magnitude)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    if digits is None:
        return f"{statistics.mean(values):.3g} ± {spread:.2g}"
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def explanation_table(per_seed: list[dict[str, float]], seeds: int) -> Table:
    table = Table(title=f"DecoyDigits CNN, test images: model vs smooth surrogate ({seeds} seeds, mean ± std)")
    for column in ("method", "explained", "infidelity", "infidelity vs model", "max-sensitivity",
                   *(f"sanity top-{n}" for n in RANDOMIZED_LAYERS)):  # fmt: skip
        table.add_column(column)
    for method in explainers(1):
        for which in ("model", "surrogate"):
            prefix = f"{method}/{which}/"

            def cell(metric: str, prefix: str = prefix) -> str:
                key = prefix + metric
                return _summary([run[key] for run in per_seed]) if key in per_seed[0] else ""

            table.add_row(
                method,
                which,
                cell("infidelity"),
                cell("infidelity_vs_model"),
                cell("sensitivity_max"),
                *(cell(f"sanity_top{n}") for n in RANDOMIZED_LAYERS),
            )
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit-batches", type=float, default=1.0, help="share of training batches per epoch")
    parser.add_argument("--samples", type=int, default=200, help="test images explained")
    parser.add_argument("--ig-steps", type=int, default=20)
    parser.add_argument("--perturbations", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.1, help="std of infidelity's Gaussian perturbations")
    parser.add_argument("--radius", type=float, default=0.05, help="max-sensitivity's uniform radius")
    parser.add_argument("--rrr-weights", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--rrr-strength", type=float, default=10.0, help="beta = tau of the RRR surrogate")
    parser.add_argument("--feedback", default="correct", choices=FEEDBACK, help="RRR's mask (decoy_digits.py)")
    parser.add_argument("--skip-rrr", action="store_true", help="only part 1")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/smooth_surrogates"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 32 images, one RRR weight")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.samples, args.ig_steps, args.perturbations = 1, 2, 32, 4, 4
        args.rrr_weights = args.rrr_weights[len(args.rrr_weights) // 2 :][:1]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    splits = {split: DecoyDigits(split) for split in ("train", "val", "test")}
    test = splits["test"]
    test_images = (test.images * (1 - test.masks))[: args.samples]
    test_targets = test.targets[: args.samples]

    # ------------------------------------------------------------------ part 1: explanations
    per_seed: list[dict[str, float]] = []
    strengths: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        model, _, seconds = train(splits, args, seed, decoy=False)
        val = splits["val"]
        val_images = val.images * (1 - val.masks)
        strength, accuracies = choose_strength(model, val_images, val.targets)
        surrogate = smooth_surrogate(model, strength, strength).eval()
        record = {
            "seed": seed,
            "strength": strength,
            "val_accuracy_model": _accuracy(model, val_images, val.targets),
            "val_accuracy_by_strength": accuracies,
            "test_accuracy_model": _accuracy(model, test_images, test_targets),
            "test_accuracy_surrogate": _accuracy(surrogate, test_images, test_targets),
            "train_seconds": seconds,
        }
        strengths.append(record)
        console.print(
            f"seed {seed}: beta = tau = {strength:g} (validation % by strength "
            + ", ".join(f"{s:g}: {a:.1f}" for s, a in accuracies.items())
            + f"; model {record['val_accuracy_model']:.1f}); test % model {record['test_accuracy_model']:.1f}, "
            f"surrogate {record['test_accuracy_surrogate']:.1f}"
        )
        per_seed.append(explanation_metrics(model, surrogate, test_images, test_targets, args, seed))
    console.print(explanation_table(per_seed, args.seeds))

    # ------------------------------------------------------------------ part 2: RRR through the surrogate
    rrr: dict[str, dict[str, Any]] = {}
    if not args.skip_rrr:
        for variant in ("exact", "surrogate"):
            trials = []
            for weight in args.rrr_weights:
                model, val_accuracy, seconds = train(
                    splits, args, 0, decoy=True, callbacks=rrr_callbacks(variant, weight, 0, args.rrr_strength)
                )
                trials.append((val_accuracy, weight, model, seconds))
            best_val, weight, best_model, _ = max(trials, key=lambda trial: trial[0])
            console.print(
                f"RRR {variant}: validation % by weight "
                + ", ".join(f"{w:g}: {v:.1f}" for v, w, _, _ in trials)
                + f" -> {weight:g}"
            )
            tests = [_accuracy(best_model, test.images, test.targets)]
            for seed in range(1, args.seeds):
                model, _, _ = train(
                    splits, args, seed, decoy=True, callbacks=rrr_callbacks(variant, weight, seed, args.rrr_strength)
                )
                tests.append(_accuracy(model, test.images, test.targets))
            rrr[variant] = {
                "weight": weight,
                "val_by_weight": {w: v for v, w, _, _ in trials},
                "test": tests,
                "seconds": [s for *_, s in trials],
            }
        table = Table(title=f"DecoyDigits, {args.feedback} feedback: RRR test accuracy % ({args.seeds} seeds)")
        for column in ("gradients", "weight (validation)", "test accuracy %"):
            table.add_column(column)
        for variant, result in rrr.items():
            name = variant if variant == "exact" else f"surrogate (beta = tau = {args.rrr_strength:g})"
            table.add_row(name, f"{result['weight']:g}", _summary(result["test"], 1))
        console.print(table)
    output = {"explanations": per_seed, "strengths": strengths, "rrr": rrr}
    (args.output_dir / "results.json").write_text(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
