"""Random streams that survive pickling into spawned workers and checkpoints, and differ between DDP ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_MASK_63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive ranks over the seed space


class SeededGenerator:
    """A CPU ``torch.Generator`` kept as plain data: its seed and, once used, its state.

    A ``torch.Generator`` cannot be sent to ``ddp_spawn`` workers under torch's default (file-descriptor) tensor
    sharing: its state tensor fails to rebuild there ("unable to resize file ... Invalid argument"). This class
    pickles as ``(seed, state bytes)`` and builds the generator on first use in the worker.

    Examples:
        >>> import pickle
        >>> stream = SeededGenerator(7)
        >>> first = torch.rand(2, generator=stream.generator)
        >>> copy = pickle.loads(pickle.dumps(stream))
        >>> torch.equal(torch.rand(2, generator=copy.generator), torch.rand(2, generator=stream.generator))
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._state: bytes | None = None
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            generator = torch.Generator().manual_seed(self.seed)
            if self._state is not None:
                generator.set_state(torch.frombuffer(bytearray(self._state), dtype=torch.uint8))
            self._generator = generator
        return self._generator

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def for_rank(self, rank: int, world_size: int) -> torch.Generator:
        """The generator of one draw on ``rank``.

        In one process it is the stream itself. Under DDP every rank advances the shared stream alike (so the
        state a checkpoint keeps, rank 0's, resumes every rank) and draws from a generator seeded with that
        step's value and its rank, so that ranks draw differently: with one seed everywhere, every rank drew the
        same permutation of its own batch.
        """
        if world_size <= 1:
            return self.generator
        shared = int(torch.randint(0, _MASK_63, (1,), generator=self.generator))
        return torch.Generator().manual_seed((shared + rank * _GOLDEN) & _MASK_63)

    def __getstate__(self) -> dict[str, Any]:
        state = self._state if self._generator is None else self._generator.get_state().numpy().tobytes()
        return {"seed": self.seed, "state": state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seed, self._state, self._generator = state["seed"], state["state"], None
