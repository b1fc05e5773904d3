"""The static uneven-padding check finds exactly the uneven strided layers of a hand-built ResNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import even_input_sizes, uneven_padding


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
