"""The static uneven-padding check finds exactly the uneven strided layers of a hand-built ResNet; the mean-map
statistics follow their definitions; the blind-spot probe finds a planted blind half."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import (
    blind_spot_map,
    border_ratio,
    even_input_sizes,
    mean_activation_map,
    mean_kernel,
    side_asymmetry,
    spatial_bias_statistics,
    uneven_padding,
)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.downsample = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride > 1 else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.downsample(x))


class ResNet(nn.Module):
    """The ResNet-18 layout (7x7/2 stem, 3x3/2 max-pool, four stages, three of them strided), narrow."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.layer3 = Block(16, 16, 2)
        self.layer4 = Block(16, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.layer4(self.layer3(self.layer2(self.layer1(self.pool(self.stem(x)))))))


def test_a_resnet_at_224_is_uneven_at_exactly_the_strided_layers_before_7x7_and_even_at_225():
    model = ResNet()
    found = uneven_padding(model, (3, 224, 224))
    # (H + 2p - k) % 2 at 224: stem (224 + 6 - 7) = 223, pool (112 + 2 - 3) = 111, then 55, 27 and 13 in each
    # strided block's 3x3 conv and 1x1 shortcut: every strided layer, in both dimensions; at 225 all are even
    paths = sorted({u.path for u in found})
    assert paths == sorted(
        ["stem", "pool", "layer2.conv1", "layer2.downsample", "layer3.conv1", "layer3.downsample",
         "layer4.conv1", "layer4.downsample"]
    )  # fmt: skip
    assert {u.dimension for u in found} == {0, 1} and all(u.remainder == 1 for u in found)
    stem = next(u for u in found if u.path == "stem" and u.dimension == 0)
    assert stem.input_size == (224, 224) and stem.padding == 3 and "skips the far side's padding" in str(stem)
    shortcut = next(u for u in found if u.path == "layer2.downsample")
    assert shortcut.padding == 0 and "input rows (no padding)" in str(shortcut)
    assert uneven_padding(model, (3, 225, 225)) == []
    assert even_input_sizes(model, (3, 224, 224), search=40) == [225, 257]
    assert model.training  # the check leaves the model's mode alone


def test_unstrided_and_mirror_padded_layers():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    assert uneven_padding(plain, (1, 10, 10)) == []
    mirrored = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1, padding_mode="reflect"))
    (record,) = [u for u in uneven_padding(mirrored, (1, 10, 11)) if u.dimension == 0]
    assert record.padding_mode == "reflect" and record.remainder == 1


@pytest.mark.parametrize(
    ("layer", "size", "remainder"),
    [
        (nn.Conv1d(1, 1, 3, stride=2, padding=1), 8, 1),  # (8 + 2 - 3) % 2
        (nn.Conv1d(1, 1, 3, stride=3, padding=0, dilation=2), 10, 2),  # (10 - 4 - 1) % 3
        (nn.MaxPool1d(2, stride=2, ceil_mode=True), 7, -1),  # one more window over an implicit pad
        (nn.AvgPool1d(3, stride=2, padding=1), 9, 0),
    ],
)
def test_remainders_follow_the_output_size_formula(layer, size, remainder):
    found = uneven_padding(nn.Sequential(layer), (1, size))
    assert [u.remainder for u in found] == ([remainder] if remainder else [])


def test_bad_shapes_are_named():
    with pytest.raises(XAIConfigurationError, match="no spatial dimension"):
        even_input_sizes(ResNet(), (3,))


# ----------------------------------------------------------------------------------------------- map statistics


def test_border_ratio_and_side_asymmetry_follow_their_definitions():
    flat = torch.ones(6, 6)
    assert float(border_ratio(flat)) == 1.0
    assert float(side_asymmetry(flat, -1)) == 0.0 and float(side_asymmetry(flat, -2)) == 0.0
    lit = flat.clone()
    lit[:, 0] = 3.0  # a bright left column: left half 3 + 1 + 1 per row against 3
    assert float(side_asymmetry(lit, -1)) == pytest.approx((5 - 3) / (5 + 3))
    assert float(side_asymmetry(lit, -2)) == 0.0
    assert float(border_ratio(lit)) == pytest.approx((6 * 3 + 14) / 20 / 1.0)  # 20 border pixels, interior 1
    odd = torch.tensor([[1.0, 9.0, 2.0]])  # the middle column counts for neither half
    assert float(side_asymmetry(odd, -1)) == pytest.approx(-1 / 3)
    assert float(side_asymmetry(torch.zeros(4, 4))) == 0.0  # a dead map is symmetric, not NaN
    assert torch.isnan(border_ratio(torch.ones(2, 5)))  # no interior
    assert set(spatial_bias_statistics(torch.ones(7))) == {"border_ratio", "lr_asymmetry"}  # 1-D maps
    mirrored = torch.rand(5, 8)
    mirrored = mirrored + mirrored.flip(-1)
    assert float(side_asymmetry(mirrored, -1)) == pytest.approx(0.0, abs=1e-7)


def test_mean_activation_map_and_mean_kernel_average_magnitudes():
    activations = torch.randn(4, 3, 5, 6)
    assert torch.allclose(mean_activation_map(activations), activations.abs().mean((0, 1)))
    weight = torch.randn(8, 4, 3, 3)
    assert torch.allclose(mean_kernel(weight), weight.abs().mean((0, 1)))
    with pytest.raises(XAIConfigurationError, match=r"\(N, C, \*spatial\)"):
        mean_activation_map(torch.ones(3, 4))
    with pytest.raises(XAIConfigurationError, match="convolution weight"):
        mean_kernel(torch.ones(3, 3))


# ----------------------------------------------------------------------------------------------- blind spots


class BlindRight(nn.Module):
    """Class 1 scores the lit pixels of the left half of the image only: blind to objects on the right."""

    def forward(self, x):
        left = x[:, 0, :, : x.shape[-1] // 2].sum((1, 2))
        return torch.stack([torch.zeros_like(left), 4 * left - 2], dim=1)


def test_blind_spot_map_scores_the_stimulus_at_every_position():
    stimulus = torch.ones(2, 2)
    scores = blind_spot_map(BlindRight(), stimulus, canvas=(1, 8, 8), target=1)
    assert scores.shape == (7, 7)
    # top-left corner at column j: the stimulus covers columns j, j + 1; the left half is columns 0-3
    covered = torch.tensor([2, 2, 2, 1, 0, 0, 0], dtype=torch.float32) * 2  # lit pixels on the left
    expected = torch.sigmoid(4 * covered - 2).expand(7, 7)
    torch.testing.assert_close(scores, expected)
    assert float(scores[:, -1].mean()) < 0.2 < 0.9 < float(scores[:, 0].mean())  # the object is missed on the right
    # batching and strides do not change the scores; a given canvas is the background
    torch.testing.assert_close(blind_spot_map(BlindRight(), stimulus, (1, 8, 8), target=1, batch_size=3), scores)
    torch.testing.assert_close(blind_spot_map(BlindRight(), stimulus, (1, 8, 8), target=1, stride=3), scores[::3, ::3])
    background = torch.zeros(1, 8, 8)
    background[0, 0, 0] = 1.0
    shifted = blind_spot_map(BlindRight(), stimulus, background, target=1)
    assert float(shifted[3, 5]) == pytest.approx(float(torch.sigmoid(torch.tensor(4.0 - 2))))


def test_blind_spot_map_picks_the_centre_prediction_keeps_modes_and_names_bad_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    scores = blind_spot_map(model, torch.rand(3, 2, 2), canvas=(3, 6, 6), batch_size=7)
    assert scores.shape == (5, 5) and model.training  # eval during the sweep (dropout off), train mode restored
    again = blind_spot_map(model, torch.rand(2, 2), canvas=torch.rand(3, 6, 6))  # a 2-D stimulus on every channel
    assert bool(((again >= 0) & (again <= 1)).all())
    with pytest.raises(XAIConfigurationError, match="larger than the canvas"):
        blind_spot_map(model, torch.rand(3, 7, 2), canvas=(3, 6, 6))
    with pytest.raises(XAIConfigurationError, match="canvas's 3 channels"):
        blind_spot_map(model, torch.rand(2, 2, 2), canvas=(3, 6, 6))
    with pytest.raises(XAIConfigurationError, match="stride"):
        blind_spot_map(model, torch.rand(2, 2), canvas=(3, 6, 6), stride=0)
