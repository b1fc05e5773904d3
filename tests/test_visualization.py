"""Rendering helpers: array shapes and dtypes, symmetric heatmap colours, HTML escaping, token pictures."""

from __future__ import annotations

import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from lightning_xai.visualization import highlight_tokens_html, render_heatmaps, render_tokens_png


def _pure(arr: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> np.ndarray:
    """Boolean mask of the pixels within ``tol`` of the colour ``rgb``."""
    return (np.abs(arr.astype(int) - np.array(rgb)) <= tol).all(axis=-1)


def test_render_heatmaps_shape_dtype_and_max_images():
    grid = render_heatmaps(torch.rand(10, 3, 8, 8), torch.randn(10, 3, 8, 8), max_images=4)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    wide = render_heatmaps(torch.rand(10, 3, 8, 8), torch.randn(10, 3, 8, 8), max_images=8)
    assert wide.shape[0] == grid.shape[0] and wide.shape[1] == 2 * grid.shape[1]  # 1.6 inch per column
    assert (grid == 255).all(axis=-1).mean() > 0.2  # white page with panels, not an all-black buffer


def test_render_heatmaps_accepts_grey_inputs_and_channelless_attributions():
    grid = render_heatmaps(torch.rand(2, 1, 8, 8) * 7 - 3, torch.randn(2, 8, 8), titles=["x", "y"])
    assert grid.dtype == np.uint8 and grid.shape[2] == 3


def test_render_heatmaps_is_symmetric_per_image():
    """+max is pure red, -max/2 is the half-way blue (not pure blue), 0 is white; each image has its own scale."""
    images = torch.full((2, 1, 16, 16), 0.5)
    attr = torch.zeros(2, 1, 16, 16)
    attr[:, 0, 2:6, 2:6] = 1.0  # left: the maximum positive attribution
    attr[:, 0, 10:14, 10:14] = -0.5  # right: half of it, negative
    attr[1] *= 0.001  # a tiny scale must look the same after per-image normalisation
    grid = render_heatmaps(images, attr, max_images=2)

    red = _pure(grid, (255, 0, 0))
    blue_half = _pure(grid, (128, 128, 255), tol=10)
    assert red.sum() > 2 * 100  # both images have their reddest patch at the max positive attribution
    assert blue_half.sum() > 2 * 100
    assert not _pure(grid, (0, 0, 255)).any()  # asymmetric min-max scaling would make -0.5 pure blue
    # The red patch is up-left of the blue patch, as in the attribution.
    half = grid.shape[1] // 2
    for cols in (slice(0, half), slice(half, None)):
        ry, rx = np.nonzero(red[:, cols])
        by, bx = np.nonzero(blue_half[:, cols])
        assert rx.size > 100 and bx.size > 100
        assert rx.mean() < bx.mean() and ry.mean() < by.mean()
    # The reddest pixel of the whole picture is inside the max-attribution patch.
    redness = grid[..., 0].astype(int) - grid[..., 2].astype(int) - grid[..., 1].astype(int)
    assert red[np.unravel_index(redness.argmax(), redness.shape)]


def test_render_heatmaps_validates_shapes():
    with pytest.raises(ValueError, match="do not match"):
        render_heatmaps(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9))
    with pytest.raises(ValueError, match="titles"):
        render_heatmaps(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), titles=["only one"])
    with pytest.raises(ValueError, match="empty"):
        render_heatmaps(torch.rand(0, 3, 8, 8), torch.rand(0, 8, 8))


def test_highlight_tokens_html_escapes_and_colours():
    out = highlight_tokens_html(["<script>", 'a"b', "good", "bad", "meh"], [0.2, 0.0, 2.0, -2.0, -1.0])
    assert "&lt;script&gt;" in out and "<script>" not in out
    assert "a&quot;b" in out
    spans = re.findall(r'<span title="([^"]*)" style="background-color:rgb\((\d+),(\d+),(\d+)\)', out)
    assert len(spans) == 5
    titles = [s[0] for s in spans]
    colours = [tuple(int(c) for c in s[1:]) for s in spans]
    assert titles[2] == "+2" and titles[3] == "-2"
    assert colours[1] == (255, 255, 255)  # zero: white
    assert colours[2][0] == 255 and colours[2][1] == colours[2][2] < 60  # max positive: strongest red
    assert colours[3][2] == 255 and colours[3][0] == colours[3][1] < 60  # max negative: strongest blue
    assert colours[4][2] == 255 and colours[3][0] < colours[4][0] < 255  # half of it: lighter blue
    assert colours[0][0] == 255 and colours[2][1] < colours[0][1] < 255  # small positive: light red


def test_highlight_tokens_html_empty_tensor_scores_and_errors():
    assert "<span" not in highlight_tokens_html([], [])
    assert highlight_tokens_html(["a", "b"], torch.tensor([0.0, 0.0])).count("rgb(255,255,255)") == 2
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        highlight_tokens_html(["a", "b"], [1.0])


def test_render_tokens_png_wraps_and_colours():
    tokens = ["word"] * 60
    scores = [1.0 if i % 2 else -1.0 for i in range(60)]
    narrow = render_tokens_png([tokens], [scores], width_px=300)
    wide = render_tokens_png([tokens], [scores], width_px=900)
    assert narrow.dtype == np.uint8 and narrow.shape[1:] == (300, 3) and wide.shape[1:] == (900, 3)
    assert narrow.shape[0] > 2 * wide.shape[0]  # long text wraps onto more lines when narrow
    strong_red = round(255 * (1 - 0.85))
    assert _pure(wide, (255, strong_red, strong_red), tol=3).sum() > 100
    assert _pure(wide, (strong_red, strong_red, 255), tol=3).sum() > 100


def test_render_tokens_png_handles_empty_rows_and_user_text():
    blank = render_tokens_png([], [])
    assert blank.dtype == np.uint8 and blank.shape[1:] == (900, 3) and (blank == 255).all()
    two = render_tokens_png([["$x$", "<b>", "a$"], []], [[1.0, -1.0, 0.0], []], width_px=400)
    one = render_tokens_png([["$x$", "<b>", "a$"]], [[1.0, -1.0, 0.0]], width_px=400)
    assert two.shape[0] > one.shape[0]  # the empty example still gets its own (blank) line
    with pytest.raises(ValueError, match="token rows"):
        render_tokens_png([["a"]], [])


def test_write_pictures_for_visual_check():
    """Writes the two pictures a person looks at: /tmp/vis_check_heatmap.png and /tmp/vis_check_tokens.png."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    attr = torch.zeros(4, 3, 16, 16)
    attr[:, 0, 3:7, 3:7] = 1.0
    attr[:, 1, 10:14, 9:13] = -0.5
    grid = render_heatmaps(images, attr, titles=[f"y={i} p={i % 2}" for i in range(4)])
    tokens = ["this", "movie", "was", "<script>", "not", "good", "at", "all", "$x$", "but", "the", "acting", "was"]
    scores = [0.1, 0.2, 0.0, -0.3, -1.0, 0.8, 0.05, -0.2, 0.4, 0.0, 0.1, 0.5, 0.0]
    png = render_tokens_png([tokens * 2, ["short", "one"]], [scores * 2, [1.0, -1.0]])
    mpimg.imsave("/tmp/vis_check_heatmap.png", grid)
    mpimg.imsave("/tmp/vis_check_tokens.png", png)
    back = mpimg.imread("/tmp/vis_check_tokens.png")
    assert back.shape[:2] == png.shape[:2]
