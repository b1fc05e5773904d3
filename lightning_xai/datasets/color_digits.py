"""ColorDigits: sklearn's 8x8 digits coloured by class, an offline analogue of ColorMNIST.

ColorMNIST (Rieger et al., 2020, "Interpretations are useful: penalizing explanations to align neural
networks with prior knowledge") colours every training digit with a colour determined by its class and
reverses the colour map at test time. A network that reads the colour instead of the shape is then
almost always wrong on the test set, which is what explanation penalties such as CDEP are meant to
prevent.
"""

from __future__ import annotations

import colorsys

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_xai.datasets._digits import NUM_CLASSES, load_digits_tensors, split_indices

__all__ = ["ColorDigits", "digit_colours"]

_NATIVE_SIZE = 8
_MAX_HUE = 0.8
# Below this an interpolated value counts as background; bilinear resizing leaves tiny float residues.
_OCCUPIED = 1e-6


def digit_colours() -> torch.Tensor:
    """Return the ten class colours, from red to purple.

    The hues are evenly spaced from 0.0 to 0.8 in HSV with full saturation and value; stopping at 0.8
    keeps the last colour away from red, which a full turn of the hue circle would come back to.

    Returns:
        Float32 tensor of shape ``(10, 3)``; row ``k`` is the RGB colour of class ``k``, in [0, 1].

    Examples:
        >>> colours = digit_colours()
        >>> colours.shape
        torch.Size([10, 3])
        >>> colours[0].tolist(), [round(v, 3) for v in colours[-1].tolist()]
        ([1.0, 0.0, 0.0], [0.8, 0.0, 1.0])
    """
    hues = torch.linspace(0.0, _MAX_HUE, NUM_CLASSES, dtype=torch.float64).tolist()
    return torch.tensor([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues], dtype=torch.float32)


class ColorDigits(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Grey 8x8 digits tinted with a class colour that flips between training and evaluation.

    Image ``x`` with label ``y`` becomes ``grey(x) * colour`` channel by channel, where ``colour`` is
    ``colours[y]`` in the ``"train"`` split and ``colours[9 - y]`` in ``"val"`` and ``"test"``. The
    three splits come from a seeded, stratified partition of the 1797 digits, so datasets built with the
    same ``seed`` and fractions are disjoint and together cover every digit.

    All images are computed once in ``__init__``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length of the square output images; values above 8 upsample with bilinear
            interpolation.
        seed: Seed of the train/val/test partition.
        val_fraction: Fraction of each class put in the validation split.
        test_fraction: Fraction of each class put in the test split.

    Attributes:
        images: Float32 tensor ``(N, 3, image_size, image_size)`` in [0, 1].
        targets: Long tensor ``(N,)`` of class labels.
        indices: Long tensor ``(N,)`` of positions in ``sklearn.datasets.load_digits()``.
        colours: Float32 tensor ``(10, 3)``, the colour of each class in the training split.
        split: The split name.

    Raises:
        ValueError: If ``split``, ``image_size`` or a fraction is invalid.

    Examples:
        >>> train = ColorDigits("train")
        >>> test = ColorDigits("test")
        >>> image, target = train[0]
        >>> image.shape, image.dtype, target.dtype
        (torch.Size([3, 8, 8]), torch.float32, torch.int64)
        >>> len(train) + len(ColorDigits("val")) + len(test)
        1797
        >>> # A red (class 0) training digit has no green or blue:
        >>> zero = train.images[train.targets == 0][0]
        >>> float(zero[0].max()) > 0, float(zero[1:].abs().max())
        (True, 0.0)
        >>> # ...while at test time class 0 is purple, the colour of class 9 in training.
        >>> zero_test = test.images[test.targets == 0][0]
        >>> float(zero_test[1].abs().max()), float(zero_test[2].max()) > 0
        (0.0, True)
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 8,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < _NATIVE_SIZE:
            raise ValueError(
                f"image_size must be an integer >= {_NATIVE_SIZE} (the digits are only ever upsampled); "
                f"got {image_size!r}."
            )
        grey_all, targets_all = load_digits_tensors()
        self.indices = split_indices(targets_all, split, seed, val_fraction, test_fraction)
        self.split = split
        self.image_size = image_size
        self.targets = targets_all[self.indices].clone()
        self.colours = digit_colours()

        grey = grey_all[self.indices].unsqueeze(1)
        if image_size != _NATIVE_SIZE:
            grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
        grey = grey.clamp(0.0, 1.0)
        # Reversing the map at evaluation time makes colour anti-predictive, so accuracy reveals whether a
        # model relied on it.
        colour_index = self.targets if split == "train" else NUM_CLASSES - 1 - self.targets
        colour = self.colours[colour_index]
        self.images = (grey * colour[:, :, None, None]).contiguous()

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def occupancy(self) -> torch.Tensor:
        """Fraction of images in this dataset whose pixel is non-zero in at least one channel.

        Useful for sampling single-pixel masks in proportion to how often a pixel carries ink.

        Returns:
            Float32 tensor of shape ``(image_size, image_size)`` with values in [0, 1]; all zeros when the
            dataset is empty.

        Examples:
            >>> occ = ColorDigits("train").occupancy()
            >>> occ.shape, bool(((occ >= 0) & (occ <= 1)).all())
            (torch.Size([8, 8]), True)
        """
        if len(self) == 0:
            return torch.zeros(self.image_size, self.image_size)
        return (self.images.amax(dim=1) > _OCCUPIED).float().mean(dim=0)
