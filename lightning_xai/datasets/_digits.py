"""Private helpers shared by the digit datasets: loading sklearn's digits and a seeded, stratified split."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SPLITS: tuple[str, ...] = ("train", "val", "test")
NUM_CLASSES = 10
# sklearn's digits are 4-bit counts of set pixels in 4x4 blocks, so 16 is the maximum value.
_DIGITS_MAX = 16.0


@lru_cache(maxsize=1)
def _load_digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    # Imported lazily so that importing the package does not pay for scikit-learn.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / _DIGITS_MAX
    targets = np.asarray(bunch.target, dtype=np.int64)
    # The cache hands out the same arrays to every caller; freezing them stops one dataset from
    # silently corrupting another.
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all 1797 sklearn digits as grey images in [0, 1] and their labels.

    Returns:
        ``(images, targets)``: a float32 tensor of shape ``(1797, 8, 8)`` and a long tensor of shape
        ``(1797,)``. Both are fresh copies that the caller may modify.
    """
    images, targets = _load_digits_numpy()
    return torch.tensor(images), torch.tensor(targets)


def check_split(split: str) -> int:
    """Return the position of ``split`` in :data:`SPLITS`, raising ``ValueError`` for anything else."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in SPLITS)}; got {split!r}.")
    return SPLITS.index(split)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions lie in [0, 1) and leave room for a training split."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1); got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 so that the train split is not empty; "
            f"got val_fraction={val_fraction!r} and test_fraction={test_fraction!r}."
        )


def split_indices(
    targets: torch.Tensor, split: str, seed: int, val_fraction: float, test_fraction: float
) -> torch.Tensor:
    """Select the indices of one split of a seeded, stratified train/val/test partition.

    Each class is shuffled on its own and cut into test, val and train parts of
    ``round(n_c * test_fraction)``, ``round(n_c * val_fraction)`` and the remainder, so every split keeps
    the class balance of the full set. The partition depends only on ``targets``, ``seed`` and the two
    fractions, which is what makes the three splits built with the same arguments disjoint.

    Args:
        targets: Class label of every sample, shape ``(N,)``.
        split: One of ``"train"``, ``"val"``, ``"test"``.
        seed: Non-negative seed of the shuffle.
        val_fraction: Fraction of each class put in the validation split.
        test_fraction: Fraction of each class put in the test split.

    Returns:
        Sorted long tensor of indices into ``targets``.

    Raises:
        ValueError: If ``split``, ``seed`` or a fraction is invalid.
    """
    which = check_split(split)
    check_fractions(val_fraction, test_fraction)
    # numpy's SeedSequence rejects negative integers with a message that does not name the argument.
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
    labels = targets.cpu().numpy()
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    # np.unique sorts the classes, so the order in which the generator is consumed is fixed.
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts = (members[n_test + n_val :], members[n_test : n_test + n_val], members[:n_test])
        chosen.append(parts[which])
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()
