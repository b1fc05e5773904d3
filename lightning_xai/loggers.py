"""Log pictures, highlighted text and tables to whatever loggers the user's ``Trainer`` has.

Lightning's ``Logger`` API only covers scalars and hyperparameters; each backend has its own way to store an
image, an HTML snippet or a table. The three functions here dispatch over ``trainer.loggers``:

================  =================================================================================================
Logger            image / HTML / table
================  =================================================================================================
TensorBoard       ``add_image(key, img, step, dataformats="HWC")`` / ``add_text(key, html, step)`` / markdown table
                  via ``add_text``. TensorBoard's text plugin sanitises HTML (inline styles are dropped), so log the
                  token picture from :func:`lightning_xai.visualization.render_tokens_png` as well.
CSV               files ``<log_dir>/media/<key>/step_<step>.png`` / ``.html`` / ``.csv``
MLflow            run artifacts ``media/<key>/step_<step>.png`` / ``.html`` / ``.csv``
W&B               ``WandbLogger.log_image`` / ``wandb.Html`` / ``WandbLogger.log_table``
other             skipped, with one warning naming the logger class
================  =================================================================================================

In file and artifact paths, ``<key>`` is the key with ``/`` (and any other character outside ``[A-Za-z0-9_.-]``)
replaced by ``_``: ``"attribution/heatmap"`` becomes ``media/attribution_heatmap/step_3.png``. Outside ``fit``
the file name starts with the stage, ``validate_step_3.png`` or ``test_step_3.png``, so that
``trainer.validate()`` after ``fit`` (at the same global step) does not overwrite the fit's last picture; a name
this process has written already gets a ``-2``, ``-3``, ... suffix.

The adapters match the logger classes of every installed Lightning package (``lightning.pytorch.loggers`` and
``pytorch_lightning.loggers``), so pictures reach the loggers of either.

Only global rank 0 writes. A failure inside a backend (full disk, a server error, a missing optional package)
never stops training: it is caught and reported once per logger class, call kind and error type with
``rank_zero_warn``. Invalid input (an image of the wrong shape) is the caller's bug and raises ``ValueError``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from lightning_xai._lightning import Trainer, logger_types, rank_zero_warn
from lightning_xai._text import visible_text

__all__ = ["log_html", "log_image", "log_table"]

_WARNED: set[tuple[str, ...]] = set()
# media folder -> the key that claimed it first in this process
_FOLDERS: dict[str, str] = {}
# (folder or run id, file name) written by this process: a second picture of one key and step gets a suffix
_WRITTEN: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, ...], message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    rank_zero_warn(message, category=UserWarning)


def _safe_name(key: str) -> str:
    """A file-system safe folder name for a metric key: ``"attr/heatmap" -> "attr_heatmap"``.

    Two keys that map to one folder (``"attr/x"`` and ``"attr_x"``) would mix their files: the second key to
    arrive in this process gets a suffix from its own hash (``attr_x-3f1c2a9b``).
    """
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", key).strip("._") or "media"
    owner = _FOLDERS.setdefault(name, key)
    if owner == key:
        return name
    return f"{name}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"


def _as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Validate an ``(H, W, 3)`` image (``uint8``, or float in ``[0, 1]``) and return it as contiguous ``uint8``.

    ``(H, W)`` and ``(H, W, 1)`` grey images are repeated to 3 channels and an alpha channel is dropped.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"log_image expects an image of shape (H, W, 3) (uint8, or float in [0, 1]), got shape {arr.shape}. "
            "Render tensors first, e.g. with lightning_xai.visualization.render_heatmaps."
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"log_image expects a uint8 or float image, got dtype {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(
                f"log_image got an integer image with values in [{arr.min()}, {arr.max()}]; expected uint8 in "
                "[0, 255] or float in [0, 1]."
            )
        return np.ascontiguousarray(arr.astype(np.uint8))
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))


def _wrap_html(key: str, fragment: str) -> str:
    """A standalone UTF-8 page around an HTML fragment (for files a browser opens directly)."""
    from html import escape

    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
        f"{escape(key)}</title></head>\n<body>\n{fragment}\n</body></html>\n"
    )


def _inert_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with ``= + - @`` (or a tab or carriage
    return) would be evaluated as formulas (``=HYPERLINK(...)``); a leading ``'`` keeps them text (OWASP)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _csv_text(columns: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([_inert_cell(c) for c in columns])
    writer.writerows([[_inert_cell(v) for v in row] for row in rows])
    return buf.getvalue()


def _markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class _Entry:
    """Where one picture, page or table goes: its key, its global step and the stage that made it."""

    def __init__(self, key: str, step: int, stage: str) -> None:
        self.key, self.step, self.stage = key, int(step), stage

    def file_name(self, owner: str, suffix: str, exists: Callable[[str], bool] = lambda name: False) -> str:
        """``step_<step><suffix>`` (``<stage>_step_...`` outside fit), unique per ``owner`` within this process."""
        stem = f"step_{self.step}" if self.stage == "fit" else f"{self.stage}_step_{self.step}"
        name, copy = f"{stem}{suffix}", 1
        while (owner, name) in _WRITTEN or exists(name):
            copy += 1
            name = f"{stem}-{copy}{suffix}"
        _WRITTEN.add((owner, name))
        return name


def _media_path(root: str, entry: _Entry, suffix: str) -> str:
    folder = os.path.join(root, "media", _safe_name(entry.key))
    os.makedirs(folder, exist_ok=True)
    # a resumed run writes into the same folder: never overwrite what an earlier process wrote
    return os.path.join(
        folder, entry.file_name(folder, suffix, lambda name: os.path.exists(os.path.join(folder, name)))
    )


def _artifact_file(run_id: str, entry: _Entry, suffix: str) -> str:
    return f"media/{_safe_name(entry.key)}/{entry.file_name(f'mlflow:{run_id}:{entry.key}', suffix)}"


# ----------------------------------------------------------------------------------------------- images


def _image_tensorboard(logger: Any, entry: _Entry, img: np.ndarray, caption: str | None) -> None:
    logger.experiment.add_image(entry.key, img, global_step=entry.step, dataformats="HWC")


def _image_csv(logger: Any, entry: _Entry, img: np.ndarray, caption: str | None) -> None:
    import matplotlib.image as mpimg

    metadata = {"Title": entry.key, **({"Description": caption} if caption else {})}
    mpimg.imsave(_media_path(logger.log_dir, entry, ".png"), img, metadata=metadata)


def _image_mlflow(logger: Any, entry: _Entry, img: np.ndarray, caption: str | None) -> None:
    logger.experiment.log_image(logger.run_id, img, artifact_file=_artifact_file(logger.run_id, entry, ".png"))


def _image_wandb(logger: Any, entry: _Entry, img: np.ndarray, caption: str | None) -> None:
    logger.log_image(key=entry.key, images=[img], step=entry.step, **({"caption": [caption]} if caption else {}))


# ------------------------------------------------------------------------------------------------- html


def _html_tensorboard(logger: Any, entry: _Entry, html: str) -> None:
    logger.experiment.add_text(entry.key, html, global_step=entry.step)


def _html_csv(logger: Any, entry: _Entry, html: str) -> None:
    with open(_media_path(logger.log_dir, entry, ".html"), "w", encoding="utf-8") as f:
        f.write(_wrap_html(entry.key, html))


def _html_mlflow(logger: Any, entry: _Entry, html: str) -> None:
    artifact = _artifact_file(logger.run_id, entry, ".html")
    logger.experiment.log_text(logger.run_id, _wrap_html(entry.key, html), artifact_file=artifact)


def _html_wandb(logger: Any, entry: _Entry, html: str) -> None:
    import wandb

    logger.log_metrics({entry.key: wandb.Html(html)}, step=entry.step)  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------------------ table


def _table_tensorboard(logger: Any, entry: _Entry, columns: list[str], rows: list[list]) -> None:
    logger.experiment.add_text(entry.key, _markdown_table(columns, rows), global_step=entry.step)


def _table_csv(logger: Any, entry: _Entry, columns: list[str], rows: list[list]) -> None:
    with open(_media_path(logger.log_dir, entry, ".csv"), "w", encoding="utf-8", newline="") as f:
        f.write(_csv_text(columns, rows))


def _table_mlflow(logger: Any, entry: _Entry, columns: list[str], rows: list[list]) -> None:
    # ``MlflowClient.log_table`` needs pandas, which mlflow-skinny does not install: a CSV artifact works everywhere.
    artifact = _artifact_file(logger.run_id, entry, ".csv")
    logger.experiment.log_text(logger.run_id, _csv_text(columns, rows), artifact_file=artifact)


def _table_wandb(logger: Any, entry: _Entry, columns: list[str], rows: list[list]) -> None:
    logger.log_table(key=entry.key, columns=list(columns), data=[list(r) for r in rows], step=entry.step)


# --------------------------------------------------------------------------------------------- dispatch

# logger class name -> adapter; the classes of every installed Lightning package match (lightning_xai._lightning)
_Handlers = dict[str, Callable[..., None]]

_IMAGE: _Handlers = {
    "TensorBoardLogger": _image_tensorboard,
    "CSVLogger": _image_csv,
    "MLFlowLogger": _image_mlflow,
    "WandbLogger": _image_wandb,
}
_HTML: _Handlers = {
    "TensorBoardLogger": _html_tensorboard,
    "CSVLogger": _html_csv,
    "MLFlowLogger": _html_mlflow,
    "WandbLogger": _html_wandb,
}
_TABLE: _Handlers = {
    "TensorBoardLogger": _table_tensorboard,
    "CSVLogger": _table_csv,
    "MLFlowLogger": _table_mlflow,
    "WandbLogger": _table_wandb,
}


@functools.cache
def _classes(name: str) -> tuple[type, ...]:
    return logger_types(name)


def _handler(logger: Any, handlers: _Handlers) -> Callable[..., None] | None:
    return next((fn for name, fn in handlers.items() if isinstance(logger, _classes(name))), None)


def _stage(trainer: Trainer) -> str:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn) or "fit")


def _dispatch(trainer: Trainer, kind: str, handlers: _Handlers, key: str, step: int, *args: Any) -> None:
    entry = _Entry(key, step, _stage(trainer))
    for logger in trainer.loggers:
        name = type(logger).__name__
        handler = _handler(logger, handlers)
        if handler is None:
            _warn_once(
                ("unsupported", name, kind),
                f"lightning_xai.loggers: {name} has no {kind} adapter (supported: {', '.join(handlers)}, from "
                f"lightning.pytorch.loggers or pytorch_lightning.loggers); the {kind} is not logged to it.",
            )
            continue
        try:
            handler(logger, entry, *args)
        except Exception as err:  # noqa: BLE001 - a picture must never stop training
            _warn_once(
                ("failed", name, kind, type(err).__name__),
                f"lightning_xai.loggers: logging a {kind} to {name} failed with {type(err).__name__}: {err}. "
                "Training goes on; further failures of this kind are not reported.",
            )


def _active(trainer: Trainer) -> bool:
    return bool(trainer.is_global_zero) and bool(trainer.loggers)


def log_image(trainer: Trainer, key: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
    """Log an RGB picture to every logger of ``trainer``.

    Args:
        trainer: The running trainer; its ``loggers`` receive the picture (only on global rank 0).
        key: Name of the picture, e.g. ``"attribution/heatmap"``.
        image: ``(H, W, 3)`` array, ``uint8`` or float in ``[0, 1]`` (floats are clipped); ``(H, W)`` grey works too.
        step: Global step (or epoch) the picture belongs to.
        caption: Optional caption (W&B shows it; CSV stores it as PNG metadata; TensorBoard and MLflow ignore it).

    Raises:
        ValueError: If ``image`` has the wrong shape or dtype. Backend failures are warned about, never raised.

    Examples:
        >>> import numpy as np
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> log_image(trainer, "attribution/heatmap", np.zeros((8, 8, 3), dtype=np.uint8), step=0)  # no loggers
    """
    img = _as_uint8_rgb(image)
    if not _active(trainer):
        return
    _dispatch(trainer, "image", _IMAGE, key, int(step), img, caption)


def log_html(trainer: Trainer, key: str, html: str, step: int) -> None:
    """Log an HTML fragment (e.g. from :func:`lightning_xai.visualization.highlight_tokens_html`).

    Args:
        trainer: The running trainer; its ``loggers`` receive the HTML (only on global rank 0).
        key: Name of the entry, e.g. ``"attribution/tokens"``.
        html: The HTML fragment. It is logged as given, except that invisible control and bidirectional
            characters are shown as ``<U+202E>`` markers: escape user text before building it.
        step: Global step (or epoch) the entry belongs to.

    Examples:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> log_html(trainer, "attribution/tokens", "<span>good</span>", step=0)  # no loggers: nothing happens
    """
    if not _active(trainer):
        return
    _dispatch(trainer, "html", _HTML, key, int(step), visible_text(str(html), html=True))


def log_table(trainer: Trainer, key: str, columns: list[str], rows: list[list], step: int) -> None:
    """Log a small table (a list of rows) to every logger of ``trainer``.

    Args:
        trainer: The running trainer; its ``loggers`` receive the table (only on global rank 0).
        key: Name of the table, e.g. ``"fairness/groups"``.
        columns: Column names.
        rows: Rows, each with ``len(columns)`` values (numbers or strings). In CSV files and artifacts a string
            that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@`` first) starts with ``'``.
        step: Global step (or epoch) the table belongs to.

    Raises:
        ValueError: If a row's length differs from ``len(columns)``.

    Examples:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> log_table(trainer, "fairness/groups", ["group", "rate"], [["a", 0.5], ["b", 0.25]], step=0)
    """
    columns = [visible_text(str(c)) for c in columns]
    rows = [[visible_text(v) if isinstance(v, str) else v for v in r] for r in rows]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(
                f"log_table({key!r}): row {i} has {len(row)} values but there are {len(columns)} columns {columns}."
            )
    if not _active(trainer):
        return
    _dispatch(trainer, "table", _TABLE, key, int(step), columns, rows)
