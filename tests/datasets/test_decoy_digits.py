"""Tests of DecoyDigits and decoy_levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_xai.datasets import ColorDigits, DecoyDigits, decoy_levels

N_DIGITS = 1797


@pytest.fixture(scope="module")
def splits() -> dict[str, DecoyDigits]:
    return {split: DecoyDigits(split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def padded_digits() -> torch.Tensor:
    grey = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.pad(grey, (2, 2, 2, 2))


def corner_slices(corner: int, size: int, patch: int) -> tuple[slice, slice]:
    far = size - patch
    top = 0 if corner < 2 else far
    left = 0 if corner % 2 == 0 else far
    return slice(top, top + patch), slice(left, left + patch)


def patch_levels(ds: DecoyDigits) -> torch.Tensor:
    """Read each image's patch level back from the image, through the mask."""
    patch_pixels = ds.images[ds.masks.bool()].view(len(ds), -1)
    # A patch has a single grey level, so min and max agree.
    assert torch.equal(patch_pixels.amin(1), patch_pixels.amax(1))
    return patch_pixels[:, 0]


def test_levels() -> None:
    levels = decoy_levels()
    assert levels.shape == (10,)
    assert torch.allclose(levels, 1.0 - 0.1 * torch.arange(10, dtype=torch.float32))
    assert float(levels[0]) == 1.0 and float(levels[9]) == pytest.approx(0.1)


def test_splits_are_disjoint_and_match_color_digits(splits: dict[str, DecoyDigits]) -> None:
    sets = [set(ds.indices.tolist()) for ds in splits.values()]
    assert sum(len(ds) for ds in splits.values()) == N_DIGITS
    assert set.union(*sets) == set(range(N_DIGITS))
    assert sum(len(s) for s in sets) == len(set.union(*sets))
    for name, ds in splits.items():
        assert torch.equal(ds.indices, ColorDigits(name).indices)


def test_sample_format(splits: dict[str, DecoyDigits]) -> None:
    ds = splits["train"]
    assert ds.images.shape == ds.masks.shape == (len(ds), 1, 12, 12)
    assert ds.images.dtype == ds.masks.dtype == torch.float32
    assert ds.targets.dtype == torch.long
    sample = ds[7]
    assert set(sample) == {"input", "target", "mask"}
    assert sample["input"].shape == sample["mask"].shape == (1, 12, 12)
    assert sample["target"].shape == () and sample["target"].dtype == torch.long
    assert torch.equal(sample["input"], ds.images[7]) and torch.equal(sample["mask"], ds.masks[7])
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0


@pytest.mark.parametrize("patch_size", [1, 2, 3])
def test_mask_is_one_square_corner_patch(patch_size: int) -> None:
    ds = DecoyDigits("test", patch_size=patch_size)
    assert torch.all(ds.masks.sum((1, 2, 3)) == patch_size**2)
    assert set(ds.masks.unique().tolist()) == {0.0, 1.0}
    for i in range(len(ds)):
        rows, cols = corner_slices(int(ds.corners[i]), 12, patch_size)
        expected = torch.zeros(1, 12, 12)
        expected[:, rows, cols] = 1.0
        assert torch.equal(ds.masks[i], expected), i


def test_corners_are_roughly_uniform(splits: dict[str, DecoyDigits]) -> None:
    corners = torch.cat([ds.corners for ds in splits.values()])
    share = torch.bincount(corners, minlength=4).float() / len(corners)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.04)


def test_digit_untouched_outside_patch(splits: dict[str, DecoyDigits], padded_digits: torch.Tensor) -> None:
    for ds in splits.values():
        outside = ~ds.masks.bool()
        assert torch.equal(ds.images[outside], padded_digits[ds.indices][outside])


def test_default_patch_never_hides_the_digit(splits: dict[str, DecoyDigits], padded_digits: torch.Tensor) -> None:
    for ds in splits.values():
        # The 2-pixel patch sits in the zero padding, where the undecorated image is blank.
        assert torch.all(padded_digits[ds.indices][ds.masks.bool()] == 0)


def test_train_level_encodes_class(splits: dict[str, DecoyDigits]) -> None:
    ds = splits["train"]
    expected = (1.0 - 0.1 * ds.targets.double()).float()
    assert torch.allclose(patch_levels(ds), expected, atol=1e-6)
    assert torch.equal(ds.levels, patch_levels(ds))


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_level_is_independent_of_class(splits: dict[str, DecoyDigits], split: str) -> None:
    ds = splits[split]
    levels = patch_levels(ds)
    assert torch.equal(ds.levels, levels)
    # Every level still comes from the set of ten class levels.
    assert torch.isclose(levels[:, None], decoy_levels()[None, :]).any(1).all()
    match = torch.isclose(levels, 1.0 - 0.1 * ds.targets.float()).float().mean()
    assert float(match) < 0.3  # about 0.1 by chance
    # All ten levels occur, so the patch is not stuck on a few values.
    assert len(torch.unique(torch.round(levels * 10))) == 10


def test_determinism_and_seed_dependence() -> None:
    a, b, c = DecoyDigits("test", seed=5), DecoyDigits("test", seed=5), DecoyDigits("test", seed=6)
    for attr in ("indices", "images", "masks", "targets", "corners", "levels"):
        assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
    assert not torch.equal(a.indices, c.indices)
    assert not torch.equal(a.masks, c.masks)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"split": "validation"}, "split"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 7}, "patch_size"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"val_fraction": -0.2}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DecoyDigits(**kwargs)  # type: ignore[arg-type]
