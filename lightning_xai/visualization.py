"""Rendering helpers for attribution and fairness pictures: heatmap grids, highlighted tokens, per-cell rates.

Every function is pure: it takes tensors or lists and returns a ``uint8`` RGB array (or an HTML string). Figures
are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so the user's matplotlib backend and global figure
state are left alone and rendering works on headless machines and in worker threads.

The arrays go straight to :mod:`lightning_xai.loggers` (``log_image`` / ``log_html``).
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from lightning_xai._text import visible_text
from lightning_xai.functional.spatial_bias import side_asymmetry, spatial_bias_statistics

__all__ = [
    "generation_attribution_html",
    "highlight_tokens_html",
    "render_blind_spot_maps",
    "render_cell_rates",
    "render_generation_heatmaps",
    "render_heatmaps",
    "render_mean_kernels",
    "render_mean_maps",
    "render_neuron_features",
    "render_neuron_histograms",
    "render_tokens_png",
    "visible_text",
]

_DPI = 100
# render_heatmaps layout in pixels: one 160 px column per example, two square panels with bands for the labels
_HEATMAP_COLUMN, _PANEL_PX, _PANEL_LEFT, _LABEL_BAND = 160, 136, 20, 22
_TOP_ROW_Y = _LABEL_BAND
_BOTTOM_ROW_Y = _TOP_ROW_Y + _PANEL_PX + 12
_HEATMAP_HEIGHT = _BOTTOM_ROW_Y + _PANEL_PX + _LABEL_BAND
_BWR = colormaps["bwr"]
_PANEL_FRAME = 0.7
_MAX_INTENSITY = 0.85  # the strongest token background is this far from white towards pure red / blue
_MAX_WRITTEN_CELLS = 30  # render_generation_heatmaps writes the values into panels of at most this many cells


def _figure_to_rgb(fig: Figure) -> np.ndarray:
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _to_unit_range(img: np.ndarray) -> np.ndarray:
    """Clamp an image already in ``[0, 1]``; min-max normalise any other range (e.g. standardised inputs)."""
    img = np.nan_to_num(img.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(img.min()), float(img.max())
    if lo >= 0.0 and hi <= 1.0:
        return img
    if hi - lo < 1e-12:
        return np.zeros_like(img)
    return (img - lo) / (hi - lo)


def render_heatmaps(
    images: torch.Tensor,
    attributions: torch.Tensor,
    titles: list[str] | None = None,
    max_images: int = 8,
) -> np.ndarray:
    """Render inputs above their attribution heatmaps as one RGB picture.

    The top row shows the inputs (RGB when ``C == 3``, grey otherwise, channel mean for ``C not in (1, 3)``);
    values inside ``[0, 1]`` are shown as they are, any other range is min-max normalised per image. The bottom
    row shows the attribution summed over channels with the diverging ``bwr`` colormap, symmetric around 0 per
    image: white is 0, pure red is the image's largest ``|attribution|`` when positive, pure blue when negative.
    The per-image scale ``max|a|`` is written under each heatmap.

    Args:
        images: Inputs of shape ``(N, C, H, W)``.
        attributions: Attributions of shape ``(N, C, H, W)`` or ``(N, H, W)``, same ``N, H, W`` as ``images``.
        titles: Optional column titles (e.g. ``"y=3 p=3"``), at least ``min(N, max_images)`` of them.
        max_images: Render only the first ``max_images`` examples.

    Returns:
        A ``uint8`` array of shape ``(height, width, 3)``.

    Raises:
        ValueError: If the shapes do not match, ``N == 0``, or there are fewer titles than rendered images.

    Examples:
        >>> import torch
        >>> grid = render_heatmaps(torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8), titles=["a", "b", "c"])
        >>> grid.dtype, grid.ndim, grid.shape[2]
        (dtype('uint8'), 3, 3)
    """
    if images.ndim != 4:
        raise ValueError(f"render_heatmaps: images must have shape (N, C, H, W), got {tuple(images.shape)}.")
    if attributions.ndim not in (3, 4):
        raise ValueError(
            f"render_heatmaps: attributions must have shape (N, C, H, W) or (N, H, W), got {tuple(attributions.shape)}."
        )
    n_all, channels, height, width = images.shape
    if attributions.shape[0] != n_all or tuple(attributions.shape[-2:]) != (height, width):
        raise ValueError(
            f"render_heatmaps: attributions of shape {tuple(attributions.shape)} do not match images of shape "
            f"{tuple(images.shape)}: N, H and W must agree."
        )
    if max_images < 1:
        raise ValueError(f"render_heatmaps: max_images must be >= 1, got {max_images}.")
    n = min(n_all, max_images)
    if n == 0:
        raise ValueError("render_heatmaps: got an empty batch (N == 0); there is nothing to render.")
    if titles is not None and len(titles) < n:
        raise ValueError(f"render_heatmaps: got {len(titles)} titles for {n} rendered images; pass one per image.")

    imgs = images[:n].detach().to(device="cpu", dtype=torch.float64).numpy()
    attrs = attributions[:n].detach().to(device="cpu", dtype=torch.float64)
    if attrs.ndim == 4:
        attrs = attrs.sum(dim=1)
    attrs_np = np.nan_to_num(attrs.numpy())

    # The panels are composed as one pixel mosaic and only the labels are drawn by matplotlib: sixteen Axes
    # took about 0.2 s per picture, most of a picture epoch's cost (benchmarks/attribution_metrics_cost.py).
    mosaic = np.ones((_HEATMAP_HEIGHT, _HEATMAP_COLUMN * n, 3))
    scales = []
    for i in range(n):
        if channels == 3:
            top = _to_unit_range(imgs[i].transpose(1, 2, 0))
        else:
            grey = _to_unit_range(imgs[i][0] if channels == 1 else imgs[i].mean(axis=0))
            top = np.repeat(grey[..., None], 3, axis=-1)
        scale = float(np.abs(attrs_np[i]).max())
        scales.append(scale)
        normalised = 0.5 + 0.5 * attrs_np[i] / (scale if scale > 0 else 1.0)  # white is 0, symmetric per image
        bottom = _BWR(normalised)[..., :3]
        for row_top, panel in ((_TOP_ROW_Y, top), (_BOTTOM_ROW_Y, bottom)):
            resized = _nearest_resize(panel, _PANEL_PX, _PANEL_PX)
            y = row_top + (_PANEL_PX - resized.shape[0]) // 2
            x = i * _HEATMAP_COLUMN + _PANEL_LEFT + (_PANEL_PX - resized.shape[1]) // 2
            h, w = resized.shape[:2]
            mosaic[y - 1 : y + h + 1, x - 1 : x + w + 1] = _PANEL_FRAME  # a white heatmap still shows its extent
            mosaic[y : y + h, x : x + w] = resized

    width_px = _HEATMAP_COLUMN * n
    fig = Figure(figsize=(width_px / _DPI, _HEATMAP_HEIGHT / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.figimage(np.round(mosaic * 255).astype(np.uint8), xo=0, yo=0, origin="upper", resize=False)

    def label(x_px: float, y_px: float, text: str, **kwargs: object) -> None:  # pixel position from the top left
        # user text ($ signs, backslashes) is shown as written, never parsed as mathtext
        fig.text(
            x_px / width_px,
            1.0 - y_px / _HEATMAP_HEIGHT,
            visible_text(text),
            ha="center",
            va="center",
            parse_math=False,
            **kwargs,
        )

    for i in range(n):
        centre = i * _HEATMAP_COLUMN + _PANEL_LEFT + _PANEL_PX / 2
        if titles is not None:
            label(centre, _TOP_ROW_Y / 2, str(titles[i]), fontsize=9)
        label(centre, _BOTTOM_ROW_Y + _PANEL_PX + _LABEL_BAND / 2, f"max|a|={scales[i]:.3g}", fontsize=8)
    label(_PANEL_LEFT / 2, _TOP_ROW_Y + _PANEL_PX / 2, "input", fontsize=9, rotation=90)
    label(_PANEL_LEFT / 2, _BOTTOM_ROW_Y + _PANEL_PX / 2, "attribution", fontsize=9, rotation=90)
    return _figure_to_rgb(fig)


def _nearest_resize(panel: np.ndarray, max_height: int, max_width: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W, 3)`` array to the largest size within the box, keeping the aspect."""
    height, width = panel.shape[:2]
    factor = min(max_height / height, max_width / width)
    out_h, out_w = max(1, int(height * factor)), max(1, int(width * factor))
    rows = np.minimum((np.arange(out_h) * height / out_h).astype(int), height - 1)
    cols = np.minimum((np.arange(out_w) * width / out_w).astype(int), width - 1)
    return panel[rows[:, None], cols[None, :]]


def _scores_list(tokens: Sequence[str], scores: Sequence[float], where: str) -> list[float]:
    values = [float(s) for s in scores]
    if len(values) != len(tokens):
        raise ValueError(f"{where}: got {len(tokens)} tokens but {len(values)} scores; pass one score per token.")
    return values


def _max_abs(values: Sequence[float]) -> float:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return max(finite, default=0.0)


def _token_colours(score: float, max_abs: float) -> tuple[tuple[int, int, int], str]:
    """Background RGB (white -> red for positive, white -> blue for negative) and a readable text colour."""
    if not math.isfinite(score) or max_abs <= 0.0:
        return (255, 255, 255), "#000000"
    intensity = min(abs(score) / max_abs, 1.0) * _MAX_INTENSITY
    other = round(255 * (1.0 - intensity))
    rgb = (255, other, other) if score > 0 else (other, other, 255) if score < 0 else (255, 255, 255)
    text = "#ffffff" if intensity > 0.6 else "#000000"
    return rgb, text


def highlight_tokens_html(tokens: list[str], scores: Sequence[float]) -> str:
    """Highlight tokens by attribution as an HTML fragment.

    Each token becomes a ``<span>`` whose background goes from white to red for positive scores and to blue for
    negative ones, with intensity ``|score| / max|score|``; hovering shows the score (``title`` attribute). Tokens
    are HTML-escaped, so user text such as ``<script>`` is shown, never run.

    Args:
        tokens: The tokens, in order.
        scores: One attribution score per token (list, 1-D array or 1-D tensor).

    Returns:
        A ``<div>`` fragment; an empty ``<div>`` for no tokens.

    Raises:
        ValueError: If ``tokens`` and ``scores`` differ in length.

    Examples:
        >>> out = highlight_tokens_html(["good", "<b>"], [1.0, -0.5])
        >>> "&lt;b&gt;" in out, "<b>" in out
        (True, False)
        >>> out.count("<span")
        2
        >>> highlight_tokens_html([], [])
        '<div class="xai-tokens" style="line-height:1.9;font-family:sans-serif"></div>'
    """
    values = _scores_list(tokens, scores, "highlight_tokens_html")
    max_abs = _max_abs(values)
    spans = []
    for token, score in zip(tokens, values):
        (r, g, b), text = _token_colours(score, max_abs)
        spans.append(
            f'<span title="{html.escape(f"{score:+.4g}", quote=True)}" '
            f'style="background-color:rgb({r},{g},{b});color:{text};padding:1px 3px;border-radius:3px">'
            f"{html.escape(visible_text(token), quote=True)}</span>"
        )
    return '<div class="xai-tokens" style="line-height:1.9;font-family:sans-serif">' + " ".join(spans) + "</div>"


def render_tokens_png(
    token_rows: list[list[str]],
    score_rows: list[Sequence[float]],
    width_px: int = 900,
) -> np.ndarray:
    """Render highlighted tokens as an RGB picture, one block of wrapped lines per example.

    Uses the colours of :func:`highlight_tokens_html` (normalised per example). Token text is drawn literally
    (no mathtext), so ``$`` in user data is safe. A token wider than the whole line is drawn on its own line and
    clipped at the right edge.

    Args:
        token_rows: One list of tokens per example.
        score_rows: One sequence of scores per example, the same lengths as ``token_rows``.
        width_px: Width of the returned picture in pixels.

    Returns:
        A ``uint8`` array of shape ``(height, width_px, 3)``; a short white strip when there is nothing to draw.

    Raises:
        ValueError: If the rows or their lengths do not match, or ``width_px`` is too small.

    Examples:
        >>> png = render_tokens_png([["a", "good", "film"], []], [[0.1, 0.9, -0.3], []], width_px=300)
        >>> png.dtype, png.shape[1], png.shape[2]
        (dtype('uint8'), 300, 3)
    """
    if len(token_rows) != len(score_rows):
        raise ValueError(
            f"render_tokens_png: got {len(token_rows)} token rows but {len(score_rows)} score rows; "
            "pass one per example."
        )
    if width_px < 50:
        raise ValueError(f"render_tokens_png: width_px must be >= 50, got {width_px}.")
    rows = [
        (list(map(visible_text, t)), _scores_list(t, s, "render_tokens_png")) for t, s in zip(token_rows, score_rows)
    ]

    fontsize = 11.0
    font = FontProperties(family="DejaVu Sans", size=fontsize)
    margin, pad, gap = 8.0, 3.0, 5.0  # px: page margin, box padding around text, space between boxes
    line_h = fontsize * _DPI / 72.0 + 2 * pad + 6.0
    row_gap = 0.6 * line_h

    # Pass 1: measure every token (widths in display pixels do not depend on the figure size).
    measure = Figure(figsize=(1, 1), dpi=_DPI)
    renderer = FigureCanvasAgg(measure).get_renderer()
    layout: list[tuple[float, float, str, float, float]] = []  # x, y (from the top), token, score, row max
    separators: list[float] = []
    y = margin
    for r, (tokens, values) in enumerate(rows):
        if r > 0:
            separators.append(y + row_gap / 2)
            y += row_gap
        max_abs = _max_abs(values)
        x = margin
        for token, score in zip(tokens, values):
            w, _, _ = renderer.get_text_width_height_descent(token or " ", font, ismath=False)
            box_w = w + 2 * pad
            if x > margin and x + box_w > width_px - margin:
                x = margin
                y += line_h
            layout.append((x, y, token, score, max_abs))
            x += box_w + gap
        y += line_h
    height_px = max(int(math.ceil(y + margin)), 2 * int(margin))

    # Pass 2: draw on a figure of the final size, in pixel coordinates measured from the top left.
    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    for x, ytop, token, score, max_abs in layout:
        (r, g, b), text_colour = _token_colours(score, max_abs)
        fig.text(
            (x + pad) / width_px,
            1.0 - (ytop + pad) / height_px,
            token,
            fontproperties=font,
            color=text_colour,
            ha="left",
            va="top",
            parse_math=False,
            bbox={
                "boxstyle": f"square,pad={pad * 72.0 / _DPI / fontsize:.3f}",
                "facecolor": (r / 255, g / 255, b / 255),
                "edgecolor": "none",
            },
        )
    for ysep in separators:
        yfig = 1.0 - ysep / height_px
        fig.add_artist(
            Line2D(
                [margin / width_px, 1.0 - margin / width_px],
                [yfig, yfig],
                transform=fig.transFigure,
                color="#bbbbbb",
                linewidth=0.8,
            )
        )
    rgb = _figure_to_rgb(fig)
    return rgb[:height_px, :width_px]


def render_cell_rates(
    cell_names: Sequence[str],
    rates: dict[str, Sequence[float]],
    counts: Sequence[float] | None = None,
    title: str = "",
    intervals: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> np.ndarray:
    """Grouped bars of per-cell rates (positive rate, TPR, FPR, accuracy, ...) as one RGB picture.

    One group of bars per intersectional cell, one bar per rate; an undefined rate (NaN) leaves a gap and is
    marked "n/a". With ``counts`` each cell's label shows its number of examples, so that a reader sees which
    rates rest on a handful of examples. The dashed line of each colour is the rate's mean over the cells.
    With ``intervals`` a whisker on a bar spans its confidence interval: two cells whose whiskers overlap
    differ by no more than sampling noise.

    Args:
        cell_names: the cells, in order.
        rates: rate name -> one value per cell, in ``[0, 1]``.
        counts: examples per cell.
        title: the figure title.
        intervals: rate name -> (lower bounds, upper bounds), one per cell (NaN: none drawn).

    Returns:
        ``(H, W, 3)`` ``uint8`` array.

    Examples:
        >>> image = render_cell_rates(
        ...     ["Male_White", "Female_White"],
        ...     {"pos_rate": [0.3, 0.1]},
        ...     counts=[90, 40],
        ...     intervals={"pos_rate": ([0.21, 0.04], [0.40, 0.23])},
        ... )
        >>> image.dtype, image.shape[2]
        (dtype('uint8'), 3)
    """
    names = list(cell_names)
    series = {key: np.asarray(list(values), dtype=np.float64) for key, values in rates.items()}
    for key, values in series.items():
        if values.shape != (len(names),):
            raise ValueError(f"render_cell_rates: rates[{key!r}] has {values.size} values for {len(names)} cells.")
    width = max(6.0, 0.55 * len(names) * max(len(series), 1) * 0.5 + 2.0)
    fig = Figure(figsize=(width, 3.6), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(names))
    bar_width = 0.8 / max(len(series), 1)
    colours = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"]
    for index, (key, values) in enumerate(series.items()):
        offset = positions - 0.4 + bar_width * (index + 0.5)
        colour = colours[index % len(colours)]
        defined = ~np.isnan(values)
        ax.bar(offset[defined], values[defined], bar_width, label=key, color=colour)
        if intervals and key in intervals:
            low, high = (np.asarray(list(bound), dtype=np.float64) for bound in intervals[key])
            shown = defined & ~np.isnan(low) & ~np.isnan(high)
            whiskers = np.stack([values[shown] - low[shown], high[shown] - values[shown]]).clip(min=0.0)
            ax.errorbar(
                offset[shown], values[shown], yerr=whiskers, fmt="none", ecolor="#222222", elinewidth=0.8, capsize=2
            )
        for x in offset[~defined]:
            ax.text(x, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color=colour)
        if defined.any():
            ax.axhline(float(values[defined].mean()), color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
    names = [visible_text(name) for name in names]
    labels = names if counts is None else [f"{name}\n(n={int(c)})" for name, c in zip(names, counts)]
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7, parse_math=False)
    ax.set_ylim(0.0, 1.2)  # the band above 1 holds the legend, clear of the bars
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("rate")
    ax.legend(fontsize=7, ncols=max(len(series), 1), loc="upper center", frameon=False)
    if title:
        ax.set_title(visible_text(title), fontsize=9, parse_math=False)
    fig.tight_layout()
    return _figure_to_rgb(fig)


def _cell_background(score: float, max_abs: float) -> str:
    (r, g, b), text = _token_colours(score, max_abs)
    return f"background-color:rgb({r},{g},{b});color:{text}"


def generation_attribution_html(
    prompt_features: list[list[str]],
    output_tokens: list[list[str]],
    token_attributions: list[Sequence[Sequence[float]]],
    captions: list[str] | None = None,
) -> str:
    """Token-by-token attribution tables of generations as an HTML fragment: one table per prompt, a row per
    output token, a column per prompt feature, each cell coloured by its attribution (red: raises the output
    token's log-probability, blue: lowers it; scaled per table) with the value on hover.

    All text (prompt features, generated tokens, captions) is HTML-escaped with invisible characters made visible,
    so a generation such as ``<script>`` is shown, never run.

    Args:
        prompt_features: per prompt, its features' labels.
        output_tokens: per prompt, the generated (or target) tokens.
        token_attributions: per prompt, ``(T, F)`` attributions (one row for a whole-sequence method).
        captions: per prompt, a caption above its table.

    Examples:
        >>> out = generation_attribution_html([["a", "<b>"]], [["x"]], [[[1.0, -0.5]]], ["<i>p</i>"])
        >>> "&lt;b&gt;" in out, "<b>" in out, "&lt;i&gt;" in out, out.count("<td")
        (True, False, True, 2)
    """
    tables = []
    for i, (features, outputs, rows) in enumerate(zip(prompt_features, output_tokens, token_attributions)):
        values = [[float(v) for v in row] for row in rows]
        max_abs = _max_abs([v for row in values for v in row])
        head = "".join(f"<th>{html.escape(visible_text(f))}</th>" for f in features)
        body = []
        for token, row in zip(outputs, values):
            cells = "".join(
                f'<td title="{v:+.4g}" style="{_cell_background(v, max_abs)};padding:2px 6px">{v:+.2f}</td>'
                for v in row
            )
            body.append(f"<tr><th style='text-align:right'>{html.escape(visible_text(token))}</th>{cells}</tr>")
        caption = f"<caption>{html.escape(visible_text(captions[i]))}</caption>" if captions else ""
        tables.append(
            f'<table class="xai-generation" style="border-collapse:collapse;font-family:sans-serif;margin:8px 0">'
            f"{caption}<tr><th>output \\ prompt</th>{head}</tr>{''.join(body)}</table>"
        )
    return "<div>" + "".join(tables) + "</div>"


def render_generation_heatmaps(
    prompt_features: list[list[str]],
    output_tokens: list[list[str]],
    token_attributions: list[Sequence[Sequence[float]]],
    titles: list[str] | None = None,
    max_panels: int = 6,
) -> np.ndarray:
    """Token-by-token heatmaps of generations: one panel per prompt, output tokens (rows) by prompt features
    (columns), red where a feature raises an output token's log-probability and blue where it lowers it, scaled per
    panel to its largest magnitude, with the values written in the cells.

    Args:
        prompt_features: per prompt, its features' labels (the x axis).
        output_tokens: per prompt, its output tokens (the y axis).
        token_attributions: per prompt, ``(T, F)`` attributions.
        titles: per prompt, a title (prompt and generation).
        max_panels: the most prompts drawn.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Examples:
        >>> picture = render_generation_heatmaps([["today", "alice"]], [["nurse", "."]], [[[0.1, 2.0], [0.0, 0.3]]])
        >>> picture.dtype, picture.shape[2]
        (dtype('uint8'), 3)
    """
    shown = list(range(min(len(prompt_features), max_panels)))
    if not shown:
        raise ValueError("render_generation_heatmaps: no prompts to draw.")
    widths = [max(len(prompt_features[i]), 1) for i in shown]
    heights = [max(len(output_tokens[i]), 1) for i in shown]
    # a fixed pixel layout (constrained layout doubles the rendering time): per panel a title band, the cells,
    # a band for the rotated prompt features and the axis label
    column_px, row_px, left_px, right_px, header_px = 62, 26, 110, 16, 44
    title_px, ticks_px = 24, 74
    width_px = max(max(widths) * column_px + left_px + right_px, 560)
    height_px = header_px + sum(title_px + h * row_px + ticks_px for h in heights)
    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    top = header_px
    for slot, i in enumerate(shown):
        rows, columns = heights[slot], widths[slot]
        values = np.nan_to_num(np.asarray(token_attributions[i], dtype=np.float64).reshape(rows, columns))
        scale = float(np.abs(values).max()) or 1.0
        top += title_px
        ax = fig.add_axes(
            (left_px / width_px, 1 - (top + rows * row_px) / height_px, columns * column_px / width_px,
             rows * row_px / height_px)
        )  # fmt: skip
        ax.imshow(values, cmap=_BWR, vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(columns), [visible_text(f) for f in prompt_features[i]], rotation=35, ha="right")
        ax.set_yticks(range(rows), [visible_text(t) for t in output_tokens[i]])
        ax.tick_params(labelsize=8, length=2)
        ax.set_xlabel("prompt feature", fontsize=8, labelpad=1)
        # values in the cells while they are legible and cheap (text dominates the rendering time); the HTML
        # table carries every value
        for (row, column), value in np.ndenumerate(values) if values.size <= _MAX_WRITTEN_CELLS else ():
            strong = abs(value) / scale > 0.6
            ax.text(column, row, f"{value:+.2f}", ha="center", va="center", fontsize=7,
                    color="white" if strong else "black")  # fmt: skip
        title = visible_text(titles[i]) if titles else f"prompt {i}"
        ax.set_title(title if len(title) < 90 else title[:87] + "...", fontsize=9, loc="left", pad=4)
        top += rows * row_px + ticks_px
    fig.text(
        8 / width_px,
        1 - 6 / height_px,
        "attribution of each output token's log-probability (rows) to each prompt feature (columns), in nats\n"
        "red: the feature raises it, blue: lowers it",
        fontsize=8,
        color="#444444",
        va="top",
    )
    return _figure_to_rgb(fig)


def render_neuron_histograms(distances: dict[str, dict[str, torch.Tensor]], bins: int = 20) -> np.ndarray:
    """Histograms of per-neuron Hellinger distances, one panel per layer (TX-Ray's "how much did neurons change").

    Args:
        distances: layer -> {"reference": (neurons,), "previous": (neurons,)} distances in ``[0, 1]``; NaN entries
            (a neuron dead at one of the two stages) are left out and counted in the legend.
        bins: bins over ``[0, 1]``.

    Returns:
        ``(H, W, 3)`` ``uint8`` array.

    Examples:
        >>> image = render_neuron_histograms({"conv": {"reference": torch.rand(50), "previous": torch.rand(50) / 4}})
        >>> image.dtype, image.shape[2]
        (dtype('uint8'), 3)
    """
    layers = [layer for layer, kinds in distances.items() if kinds]
    fig = Figure(figsize=(3.4 * max(len(layers), 1), 2.8), dpi=_DPI)
    colours = {"reference": "#4c72b0", "previous": "#dd8452"}
    labels = {"reference": "to the reference (start)", "previous": "to the previous epoch"}
    edges = np.linspace(0.0, 1.0, bins + 1)
    for index, layer in enumerate(layers):
        ax = fig.add_subplot(1, max(len(layers), 1), index + 1)
        for kind, values in distances[layer].items():
            array = values.detach().cpu().double().numpy()
            defined = array[np.isfinite(array)]
            missing = array.size - defined.size
            mean = f", mean {defined.mean():.2f}" if defined.size else ""
            label = labels.get(kind, kind) + mean + (f", {missing} dead" if missing else "")
            ax.hist(defined, bins=edges, alpha=0.6, color=colours.get(kind, "#55a868"), label=label)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("Hellinger distance (0: same features, 1: disjoint)", fontsize=7)
        ax.set_ylabel("neurons", fontsize=7)
        ax.set_title(f"{visible_text(layer)}: change of each neuron's features", fontsize=8, parse_math=False)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, frameon=False)
    fig.tight_layout()
    return _figure_to_rgb(fig)


def render_neuron_features(layers: dict[str, Sequence[tuple[int, float, str]]]) -> np.ndarray:
    """What the strongest neurons of each layer respond to: one horizontal bar per neuron (its share of the layer's
    maximal activation), labelled with its top features, one panel per layer.

    Args:
        layers: layer -> ``(neuron, mass share, "feature (share), ...")`` rows, strongest first.

    Returns:
        ``(H, W, 3)`` ``uint8`` array.

    Examples:
        >>> image = render_neuron_features({"conv": [(3, 0.4, "good (0.61), great (0.2)"), (0, 0.1, "bad (0.9)")]})
        >>> image.dtype, image.shape[2]
        (dtype('uint8'), 3)
    """
    names = [layer for layer, rows in layers.items() if rows]
    height = max((len(layers[layer]) for layer in names), default=1)
    fig = Figure(figsize=(6.4, 0.9 + 0.22 * height * max(len(names), 1)), dpi=_DPI)
    for index, layer in enumerate(names):
        rows = list(layers[layer])
        ax = fig.add_subplot(max(len(names), 1), 1, index + 1)
        positions = np.arange(len(rows))[::-1]
        shares = [share for _, share, _ in rows]
        ax.barh(positions, shares, color="#4c72b0", height=0.7)
        top = max(shares, default=1.0) or 1.0
        for y, (_, share, label) in zip(positions, rows):
            ax.text(share + 0.01 * top, y, visible_text(label), va="center", fontsize=6, parse_math=False)
        ax.set_yticks(positions)
        ax.set_yticklabels([f"neuron {neuron}" for neuron, _, _ in rows], fontsize=6)
        ax.set_xlim(0.0, top * 2.2)  # room for the feature labels right of the bars
        ax.set_xlabel("share of the layer's maximal activation; labels: top features (their share)", fontsize=7)
        ax.set_title(f"{visible_text(layer)}: what its strongest neurons respond to", fontsize=8, parse_math=False)
        ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    return _figure_to_rgb(fig)


# ------------------------------------------------------------------------------------------------ spatial bias

_SPATIAL_PANEL_INCHES = 2.6
_SPATIAL_MAX_COLUMNS = 4
_KERNEL_WRITTEN_CELLS = 49  # kernels of at most 7x7 have their values written into the cells


def _panel_grid(count: int, title: str, what: str, columns: int | None = None) -> tuple[Figure, list]:
    """A figure of ``count`` panels (at most ``columns`` a row) under ``title``, wrapped; the figure and the axes."""
    if count == 0:
        raise ValueError(f"{what}: got no panels to draw.")
    columns = min(count, columns or _SPATIAL_MAX_COLUMNS)
    rows = math.ceil(count / columns)
    width = max(_SPATIAL_PANEL_INCHES * columns + 0.4, 4.0)
    # the title is wrapped to the figure's width (about 14 characters an inch at this size), never cut off
    lines = [part for line in title.split("\n") for part in textwrap.wrap(line, width=int(width * 14)) or [""]]
    title_inches = 0.17 * len(lines) + 0.2
    # every row gets room for its panels' three-line titles and tick labels; fixed margins instead of constrained
    # layout, which took 4x the drawing time of these small figures
    # square panels take about 0.7 of a column's width (the rest holds the colour bar and the gap)
    row_inches = 0.7 * _SPATIAL_PANEL_INCHES + 0.75
    height = row_inches * rows + title_inches + 0.2
    fig = Figure(figsize=(width, height), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    fig.subplots_adjust(
        left=0.35 / width,
        right=1 - 0.75 / width,
        top=1 - (title_inches + 0.5) / height,
        bottom=0.3 / height,
        wspace=0.6,
        hspace=0.8 / (0.7 * _SPATIAL_PANEL_INCHES),
    )
    for ax in axes[count:]:
        ax.set_axis_off()
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig, axes[:count]


def _as_float_array(value: torch.Tensor) -> np.ndarray:
    return np.nan_to_num(value.detach().to("cpu", torch.float64).numpy())


def _show_panel(fig: Figure, ax, image: np.ndarray, label: str, **kwargs: object) -> None:
    shown = ax.imshow(image, interpolation="nearest", **kwargs)
    colorbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    colorbar.ax.tick_params(labelsize=6)
    colorbar.set_label(label, fontsize=7)
    ax.tick_params(labelsize=6)
    for axis in (ax.xaxis, ax.yaxis):  # positions are whole pixels
        axis.set_major_locator(MaxNLocator(integer=True))


def render_mean_maps(maps: Mapping[str, torch.Tensor], title: str = "mean |activation| per layer") -> np.ndarray:
    """One panel per layer: its mean ``|activation|`` map, own colour scale, with border ratio and asymmetries.

    Args:
        maps: layer path -> map ``(H, W)`` (an image with a colour bar) or ``(L,)`` (a line).
        title: the figure's title (the callback writes the stage and epoch into it).

    Returns:
        A ``uint8`` array ``(height, width, 3)``.

    Examples:
        >>> image = render_mean_maps({"conv1": torch.rand(8, 8), "conv2": torch.rand(4, 4)})
        >>> image.dtype, image.shape[2]
        (dtype('uint8'), 3)
    """
    fig, axes = _panel_grid(len(maps), title, "render_mean_maps")
    for ax, (layer, mean_map) in zip(axes, maps.items()):
        stats = {k: float(v) for k, v in spatial_bias_statistics(mean_map.detach().cpu().double()).items()}
        values = _as_float_array(mean_map)
        if mean_map.dim() == 1:
            ax.plot(values, marker=".")
            ax.set_xlabel("position", fontsize=7)
            ax.tick_params(labelsize=6)
        else:
            _show_panel(fig, ax, values, "mean |a|", cmap="viridis")
        ratio = stats["border_ratio"]
        border = f"{ratio:.2f}" if math.isfinite(ratio) else "n/a (no interior)"
        lines = [f"{layer} {tuple(mean_map.shape)}", f"border/interior {border}"]
        asymmetry = f"left-right {stats['lr_asymmetry']:+.3f}"
        if "tb_asymmetry" in stats:
            asymmetry += f"  top-bottom {stats['tb_asymmetry']:+.3f}"
        ax.set_title("\n".join([*lines, asymmetry]), fontsize=7)
    return _figure_to_rgb(fig)


def render_mean_kernels(kernels: Mapping[str, torch.Tensor], title: str = "mean |w| kernel per layer") -> np.ndarray:
    """One panel per convolution: its mean ``|w|`` kernel (values written in the cells) and its asymmetries.

    Args:
        kernels: layer path -> mean kernel ``(kh, kw)`` (or ``(k,)`` for 1-D convolutions).
        title: the figure's title.

    Returns:
        A ``uint8`` array ``(height, width, 3)``.

    Examples:
        >>> render_mean_kernels({"conv1": torch.rand(3, 3)}).shape[2]
        3
    """
    fig, axes = _panel_grid(len(kernels), title, "render_mean_kernels")
    for ax, (layer, kernel) in zip(axes, kernels.items()):
        grid = kernel.detach().cpu().double()
        grid = grid.unsqueeze(0) if grid.dim() == 1 else grid
        values = _as_float_array(grid)
        _show_panel(fig, ax, values, "mean |w|", cmap="magma", vmin=0.0)
        if values.size <= _KERNEL_WRITTEN_CELLS:
            high = float(values.max()) or 1.0
            for (row, column), value in np.ndenumerate(values):
                colour = "black" if value > 0.6 * high else "white"
                ax.text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        asymmetry = f"left-right {float(side_asymmetry(grid, -1)):+.3f}"
        if kernel.dim() == 2:
            asymmetry += f"\ntop-bottom {float(side_asymmetry(grid, -2)):+.3f}"
        ax.set_title(f"{layer} {tuple(kernel.shape)}\n{asymmetry}", fontsize=7)
    return _figure_to_rgb(fig)


def render_blind_spot_maps(
    maps: Mapping[str, torch.Tensor],
    title: str = "score of the stimulus per position (blind spots are dark)",
    label: str = "p(target)",
    columns: int | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> np.ndarray:
    """Blind-spot maps side by side on one colour scale (``[0, 1]``), each titled with its name, mean and minimum.

    Args:
        maps: name (a model variant, a class) -> ``(H', W')`` scores from
            :func:`~lightning_xai.functional.blind_spot_map`; entry ``(i, j)`` is the stimulus's top-left corner.
        title: the figure's title.
        label: the colour bar's label.
        columns: panels per row (at most 4 by default).
        vmin: the colour scale's low end; ``None``: the lowest value of all panels (a shared scale that shows
            small differences).
        vmax: the high end; ``None``: the highest value of all panels.

    Returns:
        A ``uint8`` array ``(height, width, 3)``.

    Examples:
        >>> render_blind_spot_maps({"zeros, 32": torch.rand(25, 25), "reflect, 32": torch.rand(25, 25)}).ndim
        3
    """
    fig, axes = _panel_grid(len(maps), title, "render_blind_spot_maps", columns)
    every = [_as_float_array(scores) for scores in maps.values()]
    low = min(float(v.min()) for v in every) if vmin is None else vmin
    high = max(float(v.max()) for v in every) if vmax is None else vmax
    for ax, name, values in zip(axes, maps, every):
        _show_panel(fig, ax, values, label, cmap="inferno", vmin=low, vmax=high)
        ax.set_xlabel("stimulus column", fontsize=7)
        ax.set_ylabel("stimulus row", fontsize=7)
        ax.set_title(f"{name}\nmean {values.mean():.2f}, min {values.min():.2f}", fontsize=7)
    return _figure_to_rgb(fig)
