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

Quantus is an optional third comparison (``pip install quantus==0.6.*`` enables its columns; without it the
table has no Quantus columns). Its classes are set up to compute the same quantities as Captum:

* ``quantus.MaxSensitivity(nr_samples=10, perturb_func=batch_uniform_noise, lower_bound=0.02,
  upper_bound=None, similarity_func=difference, norm_numerator=fro_norm, norm_denominator=fro_norm,
  abs=False, normalise=False, return_aggregate=False)``: ``x + U(-0.02, 0.02)`` on every pixel,
  ``max_k ||e(x) - e(x + u_k)||_F / ||e(x)||_F`` per example, with ``explain_func=quantus.explain`` and
  ``explain_func_kwargs={"method": "Saliency", "reduce_axes": ()}`` (Captum's ``Saliency`` with its default
  ``abs=True``, as Captum's ``sensitivity_max`` is given here; ``reduce_axes=()`` keeps the channels, which
  ``quantus.explain`` would otherwise sum). ``a_batch=None`` makes it explain the inputs itself, as Captum
  does; the "reusing" row passes the explanations as ``a_batch``.
* ``quantus.Infidelity(n_perturb_samples=10, perturb_patch_sizes=[28], perturb_func=batch_gaussian_noise,
  perturb_func_kwargs={"perturb_mean": 0.0, "perturb_std": 0.003}, loss_func="mse", abs=False,
  normalise=False)``: one patch of the image's size is one block holding every pixel and channel, so each
  sample is ``x + eps`` with ``eps ~ N(0, 0.003^2)`` on every pixel, and the score is the mean over the 10
  samples of ``(attr . (x - x_pert) - (f(x) - f(x_pert)))^2`` on the target logit: Yeh's infidelity with
  ``I = -eps`` (the same distribution, the noise being symmetric), as Captum computes it (``normalize=False``).
  Its default (4x4 patches replaced by black, *cumulatively*, MSE over the sequence of patches) is another
  quantity.

Quantus draws its noise from NumPy, so its values cannot equal ours bit for bit: both sides are evaluated
with ``--seeds`` seeds each, and the agreement table gives the seed-averaged batch means, their relative
difference, the ``z`` of that difference against its standard error (from the spread of the batch means
across seeds), and the share of examples whose seed-averaged values agree within 3 standard errors.

    python benchmarks/metrics_speed.py [--repeats 5] [--rounds 5] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import Saliency
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max
from rich.console import Console
from rich.table import Table

try:
    import quantus
    from quantus.functions.norm_func import fro_norm
    from quantus.functions.perturb_func import batch_gaussian_noise, batch_uniform_noise
    from quantus.functions.similarity_func import difference
except ImportError:
    quantus = None

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
        np.random.seed(0)  # Quantus' generator
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per side for the Quantus agreement check")
    args = parser.parse_args()
    console = Console(width=160)

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

    quantus_fns: dict[str, Callable[[], np.ndarray]] = {}
    if quantus is not None:
        inputs_np, target_np = inputs.numpy(), target.numpy()
        attributions_np, explanations_np = attributions.numpy(), explanations.numpy()
        quantus_infidelity_metric = quantus.Infidelity(
            loss_func="mse",
            perturb_patch_sizes=[inputs.shape[-1]],  # one block: every pixel and channel
            n_perturb_samples=SAMPLES,
            abs=False,
            normalise=False,
            perturb_func=batch_gaussian_noise,
            perturb_func_kwargs={"perturb_mean": 0.0, "perturb_std": NOISE_STD},
            return_aggregate=False,
            disable_warnings=True,
        )
        quantus_sensitivity_metric = quantus.MaxSensitivity(
            similarity_func=difference,
            norm_numerator=fro_norm,
            norm_denominator=fro_norm,
            nr_samples=SAMPLES,
            abs=False,
            normalise=False,
            perturb_func=batch_uniform_noise,
            lower_bound=RADIUS,  # upper_bound=None: U(-RADIUS, RADIUS)
            upper_bound=None,
            return_aggregate=False,
            disable_warnings=True,
        )
        # Captum's Saliency with its default abs=True, channels kept (quantus.explain sums them by default)
        quantus_explain_kwargs = {"method": "Saliency", "reduce_axes": ()}

        def run_quantus(metric, a_batch: np.ndarray | None, **kwargs) -> np.ndarray:
            metric.all_evaluation_scores.clear()  # Quantus keeps every call's scores
            return np.asarray(
                metric(model, inputs_np, target_np, a_batch=a_batch, channel_first=True, batch_size=BATCH, **kwargs)
            )

        quantus_fns = {
            "infidelity": lambda: run_quantus(quantus_infidelity_metric, attributions_np),
            "sensitivity_max": lambda: run_quantus(
                quantus_sensitivity_metric,
                None,
                explain_func=quantus.explain,
                explain_func_kwargs=quantus_explain_kwargs,
            ),
            "sensitivity_max (reusing)": lambda: run_quantus(
                quantus_sensitivity_metric,
                explanations_np,
                explain_func=quantus.explain,
                explain_func_kwargs=quantus_explain_kwargs,
            ),
        }
        ours_fns: dict[str, Callable[[], torch.Tensor]] = {
            "infidelity": lambda: infidelity(model, perturb, inputs, attributions, target, SAMPLES),
            "sensitivity_max": lambda: sensitivity_max(
                lambda x, t: saliency.attribute(x, target=t), inputs, target, RADIUS, SAMPLES
            ),
        }
        ours_fns["sensitivity_max (reusing)"] = ours_fns["sensitivity_max"]
        # per-example values over --seeds seeds on each side: ours from torch's generator, Quantus' from NumPy's
        agreement = {}
        for name, quantus_fn in quantus_fns.items():
            ours_values, quantus_values = [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                ours_values.append(ours_fns[name]().double().numpy())
                np.random.seed(seed)
                quantus_values.append(quantus_fn().astype(np.float64))
            ours_values, quantus_values = np.stack(ours_values), np.stack(quantus_values)
            assert quantus_values.shape == ours_values.shape == (args.seeds, BATCH), (name, quantus_values.shape)
            ours_mean, quantus_mean = ours_values.mean(), quantus_values.mean()
            # standard error of the difference of the seed-averaged batch means, from their spread across seeds
            mean_se = np.sqrt((ours_values.mean(1).var(ddof=1) + quantus_values.mean(1).var(ddof=1)) / args.seeds)
            example_se = np.sqrt((ours_values.var(0, ddof=1) + quantus_values.var(0, ddof=1)) / args.seeds)
            example_diff = np.abs(quantus_values.mean(0) - ours_values.mean(0))
            agreement[name] = (
                ours_mean,
                quantus_mean,
                (quantus_mean - ours_mean) / ours_mean,
                ours_values.mean(1).std(ddof=1) / ours_mean,
                abs(quantus_mean - ours_mean) / mean_se,
                float(np.mean(example_diff <= 3 * example_se)),
            )

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
    for name, quantus_fn in quantus_fns.items():
        configurations[f"{name}/quantus"] = quantus_fn
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
        "diff: ours vs captum, same seed"
        + ("; quantus: 0.6, same quantities, NumPy noise)" if quantus_fns else "; quantus not installed)"),
    )
    columns = [
        "metric",
        "mean value",
        "max|diff| per ex.",
        "|diff| class mean",
        "ours ms",
        "captum ms",
        "speedup",
        "captum chunked ms",
        "vs chunked",
    ]
    if quantus_fns:
        columns += ["quantus ms", "vs quantus"]
    for column in columns:
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, (per_example, mean, value) in checks.items():
        ours, captum, chunked = best[f"{name}/ours"], best[f"{name}/captum"], best[f"{name}/captum_chunked"]
        row = [
            name,
            f"{value:.4g}",
            f"{per_example:.2e}",
            f"{mean:.2e}",
            f"{ours * 1e3:.1f}",
            f"{captum * 1e3:.1f}",
            f"{captum / ours:.2f}x",
            f"{chunked * 1e3:.1f}",
            f"{chunked / ours:.2f}x",
        ]
        if quantus_fns:
            row += [f"{best[f'{name}/quantus'] * 1e3:.1f}", f"{best[f'{name}/quantus'] / ours:.2f}x"]
        table.add_row(*row)
    console.print(table)
    if not quantus_fns:
        console.print("Quantus not installed: `pip install quantus==0.6.*` adds its columns.")
        return

    agreement_table = Table(
        title=f"Quantus vs ours, {args.seeds} seeds each (Quantus: NumPy noise, ours: torch noise)\n"
        "(rel. diff: of the seed-averaged batch means; seed spread: std of our batch mean across seeds / mean; "
        "z: |diff| / its standard error; per ex.: share of examples within 3 standard errors)",
    )
    for column in ("metric", "ours mean", "quantus mean", "rel. diff", "seed spread", "z", "per ex.", "agree"):
        agreement_table.add_column(column, justify="left" if column == "metric" else "right")
    for name, (ours_mean, quantus_mean, relative, spread, z, within) in agreement.items():
        agreement_table.add_row(
            name,
            f"{ours_mean:.5g}",
            f"{quantus_mean:.5g}",
            f"{relative:+.3%}",
            f"{spread:.2%}",
            f"{z:.2f}",
            f"{within:.0%}",
            "yes" if z < 3 and within >= 0.9 else "NO",
        )
    console.print(agreement_table)


if __name__ == "__main__":
    main()
