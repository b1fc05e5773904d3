"""DecoyDigits: sklearn's 8x8 digits with a class-revealing corner patch, an offline analogue of DecoyMNIST.

DecoyMNIST (Ross et al., 2017, "Right for the right reasons: training differentiable models by
constraining their explanations") adds a small grey patch to a random corner of every digit. In the
training split the patch's grey level encodes the class, a shortcut a network will happily learn; at
evaluation time the level is random, so only a model that looks at the digit itself generalises. Each
sample carries a mask of the patch, the human annotation of the region a model should not rely on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_xai.datasets._digits import NUM_CLASSES, SPLITS, load_digits_tensors, split_indices

__all__ = ["DecoyDigits", "decoy_levels"]

PAD = 2
IMAGE_SIZE = 8 + 2 * PAD
# Patches in opposite corners must not overlap, otherwise the corner would not be identifiable.
_MAX_PATCH = IMAGE_SIZE // 2


def decoy_levels() -> torch.Tensor:
    """Return the grey level of the decoy patch for each class, ``1.0 - 0.1 * y``.

    Returns:
        Float32 tensor of shape ``(10,)``, from 1.0 for class 0 down to 0.1 for class 9; never 0, so the
        patch always differs from the zero padding.

    Examples:
        >>> [round(v, 2) for v in decoy_levels().tolist()]
        [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    """
    return torch.tensor([1.0 - 0.1 * y for y in range(NUM_CLASSES)], dtype=torch.float32)


class DecoyDigits(Dataset[dict[str, torch.Tensor]]):
    """Grey digits, zero-padded to 12x12, with a decoy patch in a random corner.

    The patch is ``patch_size`` x ``patch_size`` pixels in one of the four corners, chosen uniformly at
    random per image. Its grey level is :func:`decoy_levels` ``[y]`` in the ``"train"`` split and a level
    drawn uniformly at random from the same ten values in ``"val"`` and ``"test"``, so only the training
    patch carries label information. With the default ``patch_size=2`` the patch lies entirely in the
    zero padding and never hides part of the digit; larger patches (up to 6) overwrite the digit's border.

    The train/val/test partition is the same seeded, stratified one as
    :class:`~lightning_xai.datasets.ColorDigits` with equal arguments. The corners and random levels are
    drawn from a generator seeded with both ``seed`` and the split, so they are reproducible and
    independent between splits. All samples are computed once in ``__init__``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: Seed of the partition, the corners and the evaluation levels.
        val_fraction: Fraction of each class put in the validation split.
        test_fraction: Fraction of each class put in the test split.
        patch_size: Side length of the square patch, from 1 to 6.

    Attributes:
        images: Float32 tensor ``(N, 1, 12, 12)`` in [0, 1].
        targets: Long tensor ``(N,)`` of class labels.
        masks: Float32 tensor ``(N, 1, 12, 12)``, 1 on the decoy patch and 0 elsewhere.
        levels: Float32 tensor ``(N,)``, the grey level of each image's patch.
        corners: Long tensor ``(N,)``: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
        indices: Long tensor ``(N,)`` of positions in ``sklearn.datasets.load_digits()``.
        split: The split name.

    Raises:
        ValueError: If ``split``, ``patch_size`` or a fraction is invalid.

    Examples:
        >>> train = DecoyDigits("train")
        >>> sample = train[0]
        >>> sorted(sample), sample["input"].shape, sample["target"].dtype
        (['input', 'mask', 'target'], torch.Size([1, 12, 12]), torch.int64)
        >>> int(sample["mask"].sum())
        4
        >>> # In training the patch level gives the label away:
        >>> patch = sample["input"][sample["mask"].bool()]
        >>> int(sample["target"]), round(float(patch[0]), 2)
        (2, 0.8)
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        patch_size: int = 2,
    ) -> None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or not 1 <= patch_size <= _MAX_PATCH:
            raise ValueError(
                f"patch_size must be an integer from 1 to {_MAX_PATCH} so that the four corner patches of a "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} image do not overlap; got {patch_size!r}."
            )
        grey_all, targets_all = load_digits_tensors()
        self.indices = split_indices(targets_all, split, seed, val_fraction, test_fraction)
        self.split = split
        self.patch_size = patch_size
        self.targets = targets_all[self.indices].clone()
        n = len(self.indices)

        # Seeding with the split too keeps the evaluation levels unrelated to the training corners.
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        self.corners = torch.from_numpy(rng.integers(0, 4, size=n)).long()
        if split == "train":
            level_index = self.targets
        else:
            level_index = torch.from_numpy(rng.integers(0, NUM_CLASSES, size=n)).long()
        self.levels = decoy_levels()[level_index]

        self.masks = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE)
        far = IMAGE_SIZE - patch_size
        for corner, (top, left) in enumerate(((0, 0), (0, far), (far, 0), (far, far))):
            self.masks[self.corners == corner, :, top : top + patch_size, left : left + patch_size] = 1.0

        padded = F.pad(grey_all[self.indices].unsqueeze(1), (PAD, PAD, PAD, PAD))
        levels = self.levels[:, None, None, None].expand_as(padded)
        self.images = torch.where(self.masks.bool(), levels, padded).contiguous()

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input": self.images[index], "target": self.targets[index], "mask": self.masks[index]}
