"""Tests of ColorDigits and digit_colours."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_xai.datasets import ColorDigits, digit_colours

N_DIGITS = 1797


@pytest.fixture(scope="module")
def splits() -> dict[str, ColorDigits]:
    return {split: ColorDigits(split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def grey_digits() -> torch.Tensor:
    return torch.tensor(load_digits().images, dtype=torch.float32) / 16.0


def test_splits_are_disjoint_and_cover_all_digits(splits: dict[str, ColorDigits]) -> None:
    sets = {name: set(ds.indices.tolist()) for name, ds in splits.items()}
    assert sum(len(ds) for ds in splits.values()) == N_DIGITS
    assert set.union(*sets.values()) == set(range(N_DIGITS))
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    # Default fractions 0.2/0.2 of ~180 digits per class: 36 per class in val and test.
    assert len(splits["test"]) == pytest.approx(0.2 * N_DIGITS, abs=10)
    assert len(splits["val"]) == pytest.approx(0.2 * N_DIGITS, abs=10)


def test_split_is_stratified(splits: dict[str, ColorDigits]) -> None:
    full = torch.bincount(torch.tensor(load_digits().target), minlength=10).float() / N_DIGITS
    for ds in splits.values():
        share = torch.bincount(ds.targets, minlength=10).float() / len(ds)
        assert torch.allclose(share, full, atol=0.01)


def test_same_seed_is_deterministic_and_other_seed_differs() -> None:
    a, b, c = ColorDigits("test", seed=3), ColorDigits("test", seed=3), ColorDigits("test", seed=4)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.targets, b.targets)
    assert not torch.equal(a.indices, c.indices)


def test_fractions_change_split_sizes() -> None:
    sizes = {split: len(ColorDigits(split, val_fraction=0.1, test_fraction=0.3)) for split in ("val", "test")}
    assert sizes["val"] == pytest.approx(0.1 * N_DIGITS, abs=10)
    assert sizes["test"] == pytest.approx(0.3 * N_DIGITS, abs=10)


def test_images_and_targets_match_sklearn(splits: dict[str, ColorDigits]) -> None:
    targets = torch.tensor(load_digits().target)
    for ds in splits.values():
        assert ds.images.dtype == torch.float32 and ds.targets.dtype == torch.long
        assert ds.images.shape == (len(ds), 3, 8, 8)
        assert torch.equal(ds.targets, targets[ds.indices])
        image, target = ds[5]
        assert torch.equal(image, ds.images[5]) and int(target) == int(ds.targets[5])


def test_colours_are_red_to_purple_and_distinct() -> None:
    colours = digit_colours()
    assert colours.shape == (10, 3) and colours.dtype == torch.float32
    assert colours[0].tolist() == [1.0, 0.0, 0.0]
    hues = [colorsys.rgb_to_hsv(*rgb)[0] for rgb in colours.tolist()]
    assert hues == pytest.approx([0.8 * k / 9 for k in range(10)], abs=1e-6)
    assert colours[-1].tolist() == pytest.approx([0.8, 0.0, 1.0], abs=1e-6)
    assert torch.cdist(colours, colours).add(torch.eye(10)).min() > 0.1
    # S = V = 1: the brightest channel is always fully on and the dimmest fully off.
    assert torch.allclose(colours.amax(1), torch.ones(10))
    assert torch.allclose(colours.amin(1), torch.zeros(10))


def test_train_colour_is_class_colour_and_eval_colour_is_reversed(
    splits: dict[str, ColorDigits], grey_digits: torch.Tensor
) -> None:
    colours = digit_colours()
    for name, ds in splits.items():
        assert torch.equal(ds.colours, colours)
        colour_index = ds.targets if name == "train" else 9 - ds.targets
        grey = grey_digits[ds.indices].unsqueeze(1)
        expected = grey * colours[colour_index][:, :, None, None]
        assert torch.equal(ds.images, expected), name
        # Recover the colour independently of the reconstruction: divide each image by its grey level.
        brightest = grey.flatten(1).argmax(1)
        at_peak = ds.images.flatten(2)[torch.arange(len(ds)), :, brightest]
        peak_grey = grey.flatten(1).amax(1, keepdim=True)
        assert torch.allclose(at_peak / peak_grey, colours[colour_index], atol=1e-6), name


def test_test_colour_matches_train_colour_of_mirrored_class(splits: dict[str, ColorDigits]) -> None:
    train, test = splits["train"], splits["test"]
    train_colour = train.images.sum((2, 3)) / train.images.sum((2, 3)).amax(1, keepdim=True)
    test_colour = test.images.sum((2, 3)) / test.images.sum((2, 3)).amax(1, keepdim=True)
    for y in range(10):
        seen_in_train = train_colour[train.targets == 9 - y].mean(0)
        seen_in_test = test_colour[test.targets == y].mean(0)
        assert torch.allclose(seen_in_train, seen_in_test, atol=1e-5), y


def test_upsampled_images(grey_digits: torch.Tensor) -> None:
    ds = ColorDigits("val", image_size=28)
    assert ds.images.shape == (len(ds), 3, 28, 28)
    assert ds[0][0].shape == (3, 28, 28)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    grey = F.interpolate(grey_digits[ds.indices].unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False)
    expected = grey.clamp(0, 1) * ds.colours[9 - ds.targets][:, :, None, None]
    assert torch.allclose(ds.images, expected)
    assert ds.occupancy().shape == (28, 28)


def test_occupancy(splits: dict[str, ColorDigits]) -> None:
    for ds in splits.values():
        occupancy = ds.occupancy()
        assert occupancy.shape == (8, 8)
        assert float(occupancy.min()) >= 0.0 and float(occupancy.max()) <= 1.0
        expected = torch.stack([(image.amax(0) > 1e-6).float() for image in ds.images]).mean(0)
        assert torch.allclose(occupancy, expected)
        # Values are counts over the dataset, so every one is a multiple of 1 / len(ds).
        counts = occupancy * len(ds)
        assert torch.allclose(counts, counts.round(), atol=1e-3)
        # The centre of the 8x8 grid carries ink in most digits; the left border column is nearly empty.
        assert float(occupancy[3:5, 3:5].min()) > 0.5
        assert float(occupancy[:, 0].max()) < 0.1


def test_occupancy_is_zero_where_no_image_has_ink() -> None:
    ds = ColorDigits("train")
    never = (ds.images.amax(1) > 1e-6).sum(0) == 0
    assert bool(never.any())  # sklearn digits have pixels that are blank in every training image
    assert torch.all(ds.occupancy()[never] == 0)
    assert torch.all(ds.occupancy()[~never] > 0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"split": "training"}, "split"),
        ({"split": "TEST"}, "split"),
        ({"image_size": 7}, "image_size"),
        ({"image_size": 16.0}, "image_size"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name.replace("+", r"\+")):
        ColorDigits(**kwargs)  # type: ignore[arg-type]


def test_invalid_split_message_names_valid_splits() -> None:
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        ColorDigits("holdout")
