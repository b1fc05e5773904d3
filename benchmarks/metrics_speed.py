"""Speed of our robustness metrics against Captum's functions, on the demo CNN, measured in one run.

Model: ``ColorCNN(28)`` (the ColorDigits demo CNN) in eval mode on random ``3x28x28`` inputs, batch 64,
``n_perturb_samples=10``, Captum's ``Saliency`` as the explanation. Captum runs with its defaults
(``max_examples_per_batch=None``: all perturbed inputs in one call). Ours are the torchmetrics classes
(``update`` + ``compute``) with their default ``max_examples_per_batch="auto"`` (128-row chunks on CPU). Both sides
draw their noise from torch's global generator after the same ``torch.manual_seed``, so their values must
agree; the maximum absolute difference of the per-example values (functional kernels vs Captum) and of the
batch means (classes vs Captum) is printed.

A second Captum column times it with the same 128-row chunks (``max_examples_per_batch=128``, the setting
people use to bound memory): Captum then repeats the unperturbed forward (infidelity) in every chunk.

Each configuration is timed ``--repeats`` times per round, in ``--rounds`` interleaved rounds; the fastest
round's median is kept (interference on a shared machine only slows a run down).

    python benchmarks/metrics_speed.py [--repeats 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from captum.attr import Saliency
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from color_digits import ColorCNN  # noqa: E402

from lightning_xai.functional.robustness import (  # noqa: E402
    CPU_CHUNK_ROWS,
    gaussian_perturbation,
    infidelity,
    sensitivity_max,
)
from lightning_xai.metrics.infidelity import Infidelity  # noqa: E402
from lightning_xai.metrics.sensitivity_max import SensitivityMax  # noqa: E402

warnings.filterwarnings("ignore")
BATCH, SAMPLES, NOISE_STD, RADIUS = 64, 10, 0.003, 0.02


def _time(fn: Callable[[], object], repeats: int) -> float:
    durations = []
    for _ in range(repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    console = Console(width=120)

    torch.manual_seed(0)
    model = ColorCNN(28).eval()
    inputs = torch.rand(BATCH, 3, 28, 28)
    target = torch.randint(0, 10, (BATCH,))
    saliency = Saliency(model)
    attributions = saliency.attribute(inputs, target=target, abs=False)
    perturb = gaussian_perturbation(NOISE_STD)

    def explain_fn(module, x, t):
        return Saliency(module).attribute(x, target=t)

    infidelity_metric = Infidelity(n_perturb_samples=SAMPLES, noise_std=NOISE_STD)
    sensitivity_metric = SensitivityMax(n_perturb_samples=SAMPLES, perturb_radius=RADIUS)
    # as inside AttributionMetrics: the caller already holds explain_fn's explanation of the inputs
    reusing_metric = SensitivityMax(n_perturb_samples=SAMPLES, perturb_radius=RADIUS, reuse_attributions=True)
    explanations = saliency.attribute(inputs, target=target)

    def ours_infidelity() -> torch.Tensor:
        infidelity_metric.reset()
        infidelity_metric.update(inputs, attributions, target, model=model)
        return infidelity_metric.compute()

    def ours_sensitivity() -> torch.Tensor:
        sensitivity_metric.reset()
        sensitivity_metric.update(inputs, attributions, target, model=model, explain_fn=explain_fn)
        return sensitivity_metric.compute()

    def ours_sensitivity_reusing() -> torch.Tensor:
        reusing_metric.reset()
        reusing_metric.update(inputs, explanations, target, model=model, explain_fn=explain_fn)
        return reusing_metric.compute()

    def captum_infid(max_examples_per_batch: int | None = None) -> torch.Tensor:
        return captum_infidelity(
            model,
            perturb,
            inputs,
            attributions,
            target=target,
            n_perturb_samples=SAMPLES,
            max_examples_per_batch=max_examples_per_batch,
        )

    def captum_sens(max_examples_per_batch: int | None = None) -> torch.Tensor:
        return captum_sensitivity_max(
            saliency.attribute,
            inputs,
            perturb_radius=RADIUS,
            n_perturb_samples=SAMPLES,
            max_examples_per_batch=max_examples_per_batch,
            target=target,
        )

    # same noise on both sides -> same values
    checks = {}
    torch.manual_seed(0)
    reference = captum_infid()
    torch.manual_seed(0)
    functional = infidelity(model, perturb, inputs, attributions, target, SAMPLES)
    torch.manual_seed(0)
    metric_value = ours_infidelity()
    checks["infidelity"] = (
        (functional - reference).abs().max().item(),
        (metric_value - reference.mean()).abs().item(),
        reference.mean().item(),
    )
    torch.manual_seed(0)
    reference = captum_sens()
    torch.manual_seed(0)
    functional = sensitivity_max(lambda x, t: saliency.attribute(x, target=t), inputs, target, RADIUS, SAMPLES)
    torch.manual_seed(0)
    metric_value = ours_sensitivity()
    checks["sensitivity_max"] = (
        (functional - reference).abs().max().item(),
        (metric_value - reference.mean()).abs().item(),
        reference.mean().item(),
    )
    torch.manual_seed(0)
    reusing_value = ours_sensitivity_reusing()
    checks["sensitivity_max (reusing)"] = (
        checks["sensitivity_max"][0],
        (reusing_value - reference.mean()).abs().item(),
        reference.mean().item(),
    )
    for name, (per_example, mean, value) in checks.items():
        assert per_example <= 1e-5 * max(abs(value), 1e-12) + 1e-12, (name, per_example)
        assert mean <= 1e-5 * max(abs(value), 1e-12) + 1e-12, (name, mean)

    configurations: dict[str, Callable[[], object]] = {
        "infidelity/ours": ours_infidelity,
        "infidelity/captum": captum_infid,
        "infidelity/captum_chunked": lambda: captum_infid(CPU_CHUNK_ROWS),
        "sensitivity_max/ours": ours_sensitivity,
        "sensitivity_max/captum": captum_sens,
        "sensitivity_max/captum_chunked": lambda: captum_sens(CPU_CHUNK_ROWS),
        "sensitivity_max (reusing)/ours": ours_sensitivity_reusing,
        "sensitivity_max (reusing)/captum": captum_sens,
        "sensitivity_max (reusing)/captum_chunked": lambda: captum_sens(CPU_CHUNK_ROWS),
    }
    for fn in configurations.values():  # warm-up
        fn()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in configurations.items():
            duration = _time(fn, args.repeats)
            best[name] = min(best.get(name, float("inf")), duration)

    table = Table(
        title=f"Robustness metrics on ColorCNN(28), batch {BATCH}, {SAMPLES} perturbations, Saliency, "
        f"{torch.get_num_threads()} CPU threads\n"
        f"(captum: defaults; captum chunked: max_examples_per_batch={CPU_CHUNK_ROWS}; "
        "diff: ours vs captum, same seed)",
    )
    for column in (
        "metric",
        "mean value",
        "max|diff| per ex.",
        "|diff| class mean",
        "ours ms",
        "captum ms",
        "speedup",
        "captum chunked ms",
        "vs chunked",
    ):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, (per_example, mean, value) in checks.items():
        ours, captum, chunked = best[f"{name}/ours"], best[f"{name}/captum"], best[f"{name}/captum_chunked"]
        table.add_row(
            name,
            f"{value:.4g}",
            f"{per_example:.2e}",
            f"{mean:.2e}",
            f"{ours * 1e3:.1f}",
            f"{captum * 1e3:.1f}",
            f"{captum / ours:.2f}x",
            f"{chunked * 1e3:.1f}",
            f"{chunked / ours:.2f}x",
        )
    console.print(table)


if __name__ == "__main__":
    main()
