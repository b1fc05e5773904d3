"""CDEP's cost against its physical floor, across batch sizes and image sizes, and the memory it keeps for backward.

The floor is two forward streams and one backward through the same network (the relevant part and the ordinary
activation), without the bias split: what any contextual decomposition must compute. CDEP here is the real
penalty step: ``decompose`` (the CD interpreter, with its max-pooling and bias-split rules), the task loss on the
decomposition's total stream and ``cdep_penalty``. Vanilla is one forward and backward of the task loss.

Memory is what the step keeps for its backward (every tensor autograd saves, counted once per storage), which is
what sets the step's peak memory; it is measured exactly, not from the allocator.

Every configuration is timed in ``--rounds`` interleaved rounds and its fastest is kept (interference only ever slows
a run down); no allocator settings are changed.

    python benchmarks/cdep_scaling.py [--rounds 3] [--kernel auto|eager|compiled]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from color_digits import ColorCNN  # noqa: E402

from lightning_xai.attribution import set_cd_kernel  # noqa: E402
from lightning_xai.attribution.contextual_decomposition import decompose  # noqa: E402
from lightning_xai.functional import cdep_penalty  # noqa: E402

#: (image size, batch): the batch sweep at 28 px, the size sweep at batch 256
CONFIGURATIONS = [(28, 64), (28, 256), (28, 1024), (56, 256), (112, 256)]


def _steps(model: ColorCNN, size: int, batch: int) -> dict[str, Callable[[], None]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator) * (
        torch.rand(batch, 1, size, size, generator=generator) > 0.6
    )
    y = torch.randint(0, 10, (batch,), generator=generator)
    mask = torch.zeros(batch, 1, size, size)
    rows = torch.arange(batch)
    mask[rows, 0, torch.randint(0, size, (batch,), generator=generator), torch.randint(0, size, (batch,))] = 1

    def vanilla() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def floor() -> torch.Tensor:
        return F.cross_entropy(model(x), y) + model(x * mask).pow(2).mean()

    def cdep() -> torch.Tensor:
        decomposition = decompose(model, x, mask)
        penalty = cdep_penalty(decomposition.relevant, decomposition.irrelevant, None, "image")
        return F.cross_entropy(decomposition.total, y) + penalty

    return {"vanilla": vanilla, "floor": floor, "cdep": cdep}


def _seconds(loss: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    loss().backward()
    return time.perf_counter() - start


def _saved_bytes(loss: Callable[[], torch.Tensor]) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = loss()
    value.backward()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel", choices=["auto", "eager", "compiled"], default="auto")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="only these image sizes")
    args = parser.parse_args()
    set_cd_kernel(args.kernel)
    torch.manual_seed(0)
    configurations = [c for c in CONFIGURATIONS if args.sizes is None or c[0] in args.sizes]
    steps = {c: _steps(ColorCNN(image_size=c[0]), *c) for c in configurations}
    for per_config in steps.values():  # warm-up: traces, compiled kernels, allocator
        for loss in per_config.values():
            _seconds(loss)
    fastest: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for config, per_config in steps.items():
            for name, loss in per_config.items():
                fastest[(config, name)] = min(_seconds(loss), fastest.get((config, name), float("inf")))
    table = Table(
        title=f"CDEP step vs vanilla and the two-stream floor (demo CNN, fastest of {args.rounds}, "
        f"{torch.get_num_threads()} threads, CD kernel {args.kernel})"
    )
    for column in (
        "image",
        "batch",
        "vanilla ms",
        "CDEP ms",
        "CDEP / vanilla",
        "CDEP / floor",
        "us / sample",
        "saved for backward, x vanilla",
    ):
        table.add_column(column, justify="right")
    for config, per_config in steps.items():
        size, batch = config
        vanilla, floor, cdep = (fastest[(config, name)] for name in ("vanilla", "floor", "cdep"))
        memory = _saved_bytes(per_config["cdep"]) / _saved_bytes(per_config["vanilla"])
        table.add_row(
            f"{size} px",
            str(batch),
            f"{1000 * vanilla:.0f}",
            f"{1000 * cdep:.0f}",
            f"{cdep / vanilla:.2f}",
            f"{cdep / floor:.2f}",
            f"{1e6 * cdep / batch:.0f}",
            f"{memory:.2f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
