"""How close the finite-difference parameter gradient of the input-gradient penalties is to the exact one.

For RRR, Input x Gradient and Expected Gradients on a small CNN, an MLP and an Embedding + LSTM text model
(float32, random weights and data, the mask on a third of the features), prints the cosine and the relative
error ``||g_fd - g_exact|| / ||g_exact||`` of the parameter gradient for a grid of relative steps ``h``
(:data:`~lightning_xai.functional.penalties.FINITE_DIFFERENCE_STEP`), one-sided (the library's scheme) and
central (the mean of the one-sided differences at ``+h`` and ``-h``, which would cost one forward more).

    python benchmarks/finite_difference_agreement.py [--steps 1e-2 1e-3 1e-4] [--seeds 3]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_xai.functional import penalties
from lightning_xai.functional.penalties import expected_gradients_penalty, input_x_gradient_penalty, rrr_penalty


class TextLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(embeddings)[0][:, -1])


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def problem(kind: str, seed: int):
    """``(parameters, inputs_fn, forward, mask, target)``: ``inputs_fn()`` gives the explained tensor afresh."""
    torch.manual_seed(seed)
    if kind == "lstm":
        model = TextLSTM()
        ids = torch.randint(0, 50, (8, 9))
        mask = torch.zeros(8, 9)
        mask[:, 2:5] = 1
        return list(model.parameters()), lambda: model.embedding(ids), model.from_embeddings, mask, ids[:, 0] % 3
    model, shape, classes = (_cnn(), (8, 1, 12, 12), 10) if kind == "cnn" else (_mlp(), (8, 20), 4)
    x = torch.randn(shape)
    mask = (torch.rand(shape) < 1 / 3).float()
    return list(model.parameters()), lambda: x, model, mask, torch.randint(0, classes, (8,))


def penalty(method: str, forward, inputs, mask, target, differentiation: str) -> torch.Tensor:
    if method == "rrr":
        return rrr_penalty(forward, inputs, mask, differentiation=differentiation)
    if method == "input_x_gradient":
        return input_x_gradient_penalty(forward, inputs, mask, target, differentiation=differentiation)
    return expected_gradients_penalty(
        forward,
        inputs,
        mask,
        target,
        num_references=2,
        generator=torch.Generator().manual_seed(0),
        differentiation=differentiation,
    )


def gradient(kind: str, seed: int, method: str, differentiation: str, step: float | None = None) -> torch.Tensor:
    parameters, inputs, forward, mask, target = problem(kind, seed)
    if step is not None:
        penalties.FINITE_DIFFERENCE_STEP = step
    value = penalty(method, forward, inputs(), mask, target, differentiation)
    # Expected Gradients explains detached path points: no gradient reaches a text model's embedding
    gradients = torch.autograd.grad(value, parameters, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(parameters, gradients)])


def agreement(estimate: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(estimate, exact, dim=0).item()
    return cosine, ((estimate - exact).norm() / exact.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=float, nargs="+", default=[1e-1, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    default = penalties.FINITE_DIFFERENCE_STEP
    table = Table(title=f"FD vs exact parameter gradient: worst cosine / worst relative error over {args.seeds} seeds")
    for column in ("model", "penalty", "h", "one-sided cos", "one-sided rel", "central cos", "central rel"):
        table.add_column(column, justify="left" if column in ("model", "penalty") else "right")
    for kind in ("cnn", "mlp", "lstm"):
        for method in ("rrr", "input_x_gradient", "expected_gradients"):
            exact = [gradient(kind, seed, method, "double_backward") for seed in range(args.seeds)]
            for step in args.steps:
                one_sided, central = [], []
                for seed in range(args.seeds):
                    forward_step = gradient(kind, seed, method, "finite_difference", step)
                    backward_step = gradient(kind, seed, method, "finite_difference", -step)
                    one_sided.append(agreement(forward_step, exact[seed]))
                    central.append(agreement((forward_step + backward_step) / 2, exact[seed]))
                table.add_row(
                    kind,
                    method,
                    f"{step:g}",
                    f"{min(c for c, _ in one_sided):.6f}",
                    f"{max(r for _, r in one_sided):.2e}",
                    f"{min(c for c, _ in central):.6f}",
                    f"{max(r for _, r in central):.2e}",
                )
    penalties.FINITE_DIFFERENCE_STEP = default
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
