"""SpatialBiasMonitor: Mind the Pad's checks of a CNN (uneven padding, mean feature maps, mean kernels, blind spots)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_xai._contract import eval_mode, named_submodule
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_warn
from lightning_xai.callbacks._base import EpochMetricCallback, Stage
from lightning_xai.errors import MissingBatchKeyError, UnevenPaddingError, XAIConfigurationError
from lightning_xai.functional.spatial_bias import (
    UnevenPadding,
    blind_spot_map,
    even_input_sizes,
    mean_kernel,
    side_asymmetry,
    spatial_bias_statistics,
    uneven_padding,
)
from lightning_xai.metrics.mean_activation_map import MeanActivationMap
from lightning_xai.mixin import XAIMixin

#: the layers watched when ``layers`` is not given
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
# mirror and circular padding put data, not zeros, on the border: the paper's fix, so not reported
_ZERO_PADDING = "zeros"


class SpatialBiasMonitor(EpochMetricCallback):
    """Watches a CNN for the spatial bias of Mind the Pad (Alsallakh et al., ICLR 2021): uneven padding, border and
    side asymmetries of the mean feature maps, asymmetric mean kernels and (optionally) blind spots.

    **Static check.** For the input size the model is trained on (``input_shape``, else the first batch the
    trainer hands to any hook), every strided convolution or pooling that consumes its zero padding on one side only
    (:func:`~lightning_xai.functional.uneven_padding`) is listed once in a warning, with the layer paths and the
    input sizes at which every stage would pad evenly (:func:`~lightning_xai.functional.even_input_sizes`);
    ``strict=True`` raises :class:`~lightning_xai.errors.UnevenPaddingError` instead, before the first step. With
    ``input_shape`` the check runs in ``setup``; the batch shape is not known there, so without it the check runs on
    the first batch (before the model sees it). Layers with mirror or circular padding are not reported.

    **Per computed epoch**, on a fixed probe set (``num_samples`` inputs drawn once with ``seed`` from the validation
    loader, the test loader under ``trainer.test()``, or ``dataset``), one forward pass without gradients, the model
    in eval mode (its modes restored), with forward hooks on ``layers``, accumulates each layer's mean
    ``|activation|`` map (averaged over samples and channels) in a :class:`~lightning_xai.metrics.MeanActivationMap`
    attached to the LightningModule in ``setup``: float64 sum states, exact under DDP, where each rank maps
    ``ceil(num_samples / world_size)`` samples of its shard of the loader (or its share of one draw from
    ``dataset``). Logged per layer (``spatial/<layer>/<key>``, under
    ``trainer.test()`` ``test/spatial/<layer>/<key>``):

    * ``border_ratio``: the mean of the map's 1-pixel border over the mean of its interior (1: no border artefact);
    * ``lr_asymmetry``, ``tb_asymmetry``: ``(first half - second half) / (first half + second half)`` of the map
      along its width (left minus right) and height (top minus bottom), the middle row or column of an odd size left
      out: 0 for a mirror-symmetric map, in ``[-1, 1]``, positive when the left (top) side is stronger;
    * for convolutions, ``kernel_lr_asymmetry`` and ``kernel_tb_asymmetry``: the same indices of the layer's mean
      ``|w|`` kernel (averaged over output and input channels, the paper's mean 3x3 kernels);
    * ``spatial/uneven_layers``: how many strided layers the static check found;
    * with ``blind_spot_stimulus``: ``spatial/blind_spot/mean`` and ``.../min``, the probability of
      ``blind_spot_target`` with the stimulus pasted at every position of a blank (or the probe's mean) image
      (:func:`~lightning_xai.functional.blind_spot_map`).

    Pictures (rank 0, on the picture cadence, through the trainer's loggers): ``spatial/mean_maps`` (every layer's
    map with a colour bar and its indices), ``spatial/mean_kernels`` and ``spatial/blind_spot``.

    It works inside ``fit`` (validation runs under ``no_grad``), ``trainer.validate()`` (inference mode: the probe
    is cloned and the states are made inside ``torch.inference_mode(False)``) and ``trainer.test()``. Sanity-check
    passes are skipped.

    Args:
        layers: paths of the layers to map (``model.named_modules()`` names, e.g. ``"features.0"``); by default every
            ``Conv1d`` and ``Conv2d`` of the LightningModule. A layer's output must be ``(N, C, *spatial)``.
        num_samples: probe-set size (over all ranks).
        batch_size: probe samples per forward pass.
        every_n_epochs: compute every this many epochs of ``fit``.
        pictures_every_n_epochs: log pictures on the first computation and every this many after it; 0 never.
        input_shape: one training sample's shape ``(C, H, W)`` for the static check in ``setup``; by default the
            first batch's.
        check_padding: run the static check at all.
        strict: raise :class:`~lightning_xai.errors.UnevenPaddingError` instead of warning.
        size_search: how far above the input size the check looks for even sizes.
        blind_spot_stimulus: a small object ``(C, h, w)`` or ``(h, w)`` to sweep over the canvas each computation.
        blind_spot_target: the class whose probability the blind-spot map shows; by default the class predicted with
            the stimulus at the centre.
        blind_spot_canvas: ``"zeros"`` (a blank image) or ``"mean"`` (the probe's mean input).
        blind_spot_stride: the step between stimulus positions.
        name: the log prefix (``spatial`` by default) and ``state_key`` part.
        seed: seed of the probe-set draw.
        dataset: draw the probe set from this dataset instead of the validation (test) loader. Without a
            validation loop the monitor then computes at the end of training epochs.

    Examples:
        >>> monitor = SpatialBiasMonitor(layers=["features.0", "features.2"], num_samples=32, strict=True)
        >>> monitor.state_key, monitor.key("features.0/lr_asymmetry", "test")
        ("SpatialBiasMonitor{'name': 'spatial'}", 'test/spatial/features.0/lr_asymmetry')
    """

    requires_mixin: ClassVar[bool] = True
    mixin_use: ClassVar[str] = "reads probe batches and logits through XAIMixin"

    def __init__(
        self,
        layers: list[str] | None = None,
        num_samples: int = 64,
        batch_size: int = 64,
        every_n_epochs: int = 1,
        pictures_every_n_epochs: int = 5,
        input_shape: list[int] | None = None,
        check_padding: bool = True,
        strict: bool = False,
        size_search: int = 32,
        blind_spot_stimulus: Tensor | None = None,
        blind_spot_target: int | None = None,
        blind_spot_canvas: Literal["zeros", "mean"] = "zeros",
        blind_spot_stride: int = 1,
        name: str | None = None,
        seed: int = 0,
        dataset: Dataset | None = None,
    ) -> None:
        super().__init__(name=name, every_n_epochs=every_n_epochs, pictures_every_n_epochs=pictures_every_n_epochs)
        if min(num_samples, batch_size, blind_spot_stride) < 1 or size_search < 0:
            raise XAIConfigurationError(
                "SpatialBiasMonitor: num_samples, batch_size and blind_spot_stride must be >= 1 and size_search >= 0, "
                f"got {num_samples}, {batch_size}, {blind_spot_stride} and {size_search}."
            )
        if blind_spot_canvas not in ("zeros", "mean"):
            raise XAIConfigurationError(
                f"SpatialBiasMonitor: blind_spot_canvas must be 'zeros' or 'mean', got {blind_spot_canvas!r}."
            )
        if input_shape is not None and len(input_shape) < 2:
            raise XAIConfigurationError(
                f"SpatialBiasMonitor: input_shape is one sample's (C, H, W) (or (C, L)), got {list(input_shape)}."
            )
        self.layers = None if layers is None else list(layers)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]
        self.check_padding = bool(check_padding)
        self.strict = bool(strict)
        self.size_search = int(size_search)
        self.blind_spot_stimulus = blind_spot_stimulus
        self.blind_spot_target = blind_spot_target
        self.blind_spot_canvas = blind_spot_canvas
        self.blind_spot_stride = int(blind_spot_stride)
        self.seed = int(seed)
        self.dataset = dataset
        #: the uneven layers the static check found (``None`` before it ran)
        self.uneven: list[UnevenPadding] | None = None
        self._layer_names: list[str] = []
        self._probes: dict[Stage, Tensor] = {}

    def default_name(self) -> str:
        return "spatial"

    @property
    def _attribute_name(self) -> str:
        return "xai_spatial_bias_" + "".join(c if c.isalnum() else "_" for c in self.name)

    # ------------------------------------------------------------------------------------- setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.refuse_compiled(pl_module, "layer outputs")
        if self.layers is None:
            names = [n for n, m in pl_module.named_modules() if n and isinstance(m, DEFAULT_LAYER_TYPES)]
            if not names:
                raise XAIConfigurationError(
                    f"{self.where} maps every Conv1d/Conv2d by default, and {type(pl_module).__name__} has none: pass "
                    "layers=[...] with the paths of the layers whose outputs are (N, C, *spatial)."
                )
        else:
            names = self.layers
            for layer in names:
                named_submodule(pl_module, layer, self.where)
        self._layer_names = list(names)
        if not hasattr(pl_module, self._attribute_name):
            # A metric that logs or syncs must be an attribute of the LightningModule (device moves, DDP);
            # ModuleDict keys may not hold dots, so the maps are kept in layer order.
            maps = nn.ModuleDict({str(i): MeanActivationMap() for i in range(len(names))})
            pl_module.add_module(self._attribute_name, maps)
        if self.input_shape is not None:
            self._check(pl_module, self.input_shape)

    def _maps(self, pl_module: LightningModule) -> nn.ModuleDict:
        return getattr(pl_module, self._attribute_name)

    # ------------------------------------------------------------------------------------- static check

    def _check(self, pl_module: LightningModule, input_shape: Sequence[int]) -> None:
        if not self.check_padding or self.uneven is not None:
            return
        shape = [int(s) for s in input_shape]
        try:
            found = [u for u in uneven_padding(pl_module, shape) if u.padding_mode == _ZERO_PADDING]
        except Exception as error:
            raise XAIConfigurationError(
                f"{self.where}: the uneven-padding check runs the model once on zeros of shape {(1, *shape)} and that "
                f"failed with {type(error).__name__}: {error}. Pass the right input_shape=, or check_padding=False."
            ) from error
        self.uneven = found
        if not found:
            return
        message = self._uneven_message(pl_module, shape, found)
        if self.strict:
            raise UnevenPaddingError(message + " (strict=False only warns.)")
        rank_zero_warn(message, category=UserWarning)

    def _uneven_message(self, pl_module: LightningModule, shape: list[int], found: list[UnevenPadding]) -> str:
        paths = list(dict.fromkeys(u.path for u in found))
        spatial = len(shape) - 1
        sizes = []
        for dimension in sorted({u.dimension for u in found}):
            even = even_input_sizes(pl_module, shape, dimension=dimension, search=self.size_search)[:3]
            what = ("height", "width")[dimension] if spatial == 2 else f"spatial dimension {dimension}"
            sizes.append(f"{what} {even or f'none within +{self.size_search}'}")
        # one entry per layer call: its input size and the dimensions whose far-side padding (or rows) it skips
        calls: dict[tuple[str, str, tuple[int, ...]], list[int]] = {}
        for u in found:
            calls.setdefault((u.path, u.layer, u.input_size), []).append(u.dimension)
        details = "; ".join(
            f"{path} ({layer}) on input {size}: dimensions {dims}" for (path, layer, size), dims in calls.items()
        )
        return (
            f"{self.where}: at input shape {tuple(shape)}, {len(paths)} strided layer(s) consume their zero padding on "
            f"one side only (Mind the Pad, Alsallakh et al. 2021): {paths}. Their kernels see zeros on the top/left "
            f"border but not on the bottom/right one, which skews feature maps and can leave blind spots. Uneven: "
            f"{details}. Input sizes at which every stage pads evenly: {', '.join(sizes)}; or use "
            "padding_mode='reflect' (mirror padding) in those layers."
        )

    def _check_batch(self, pl_module: LightningModule, batch: Any) -> None:
        if not self.check_padding or self.uneven is not None:
            return
        assert isinstance(pl_module, XAIMixin)
        inputs = pl_module.xai_batch(batch).get("input")
        if isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.dim() >= 3:
            self._check(pl_module, inputs.shape[1:])

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._check_batch(pl_module, batch)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._check_batch(pl_module, batch)
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._check_batch(pl_module, batch)
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------------------------- probe

    def _build_probe(self, trainer: Trainer, pl_module: XAIMixin, stage: Stage) -> Tensor:
        loader = self.probe_loader(trainer, stage, self.batch_size)
        # each rank maps its share of the probe set; the sum states add the shares up. Lightning shards the
        # loaders over the ranks; a given dataset is the same on every rank, so the ranks split one draw of it.
        world_size, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        wanted = self.num_samples if self.dataset is not None else math.ceil(self.num_samples / world_size)
        pool: list[Tensor] = []
        for batch in loader:
            data = pl_module.xai_batch(batch)
            if "input" not in data:
                raise MissingBatchKeyError(
                    f"{self.where} needs the batch key 'input', but the batch has {sorted(data)}; override xai_batch()."
                )
            pool.append(torch.as_tensor(data["input"]))
            if sum(len(p) for p in pool) >= 4 * wanted:
                break
        inputs = torch.cat(pool).clone()
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(inputs.shape[0], generator=generator)[:wanted].sort().values
        if self.dataset is not None:
            chosen = chosen[rank::world_size]
        return inputs[chosen].clone()

    # ------------------------------------------------------------------------------------- hooks

    @override
    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        assert isinstance(pl_module, XAIMixin)
        # validate() runs under inference mode: states and probe made there could not be updated in fit
        with torch.inference_mode(False):
            if stage not in self._probes:
                self._probes[stage] = self._build_probe(trainer, pl_module, stage)
            probe = self._probes[stage]
            if probe.is_floating_point() and probe.dim() >= 3:
                self._check(pl_module, probe.shape[1:])
            try:
                with eval_mode(pl_module):
                    self._update_maps(pl_module, probe)
                    blind_spot = self._blind_spot(pl_module, probe)
            finally:
                self.remove_hooks()
            maps = {}
            for layer, metric in zip(self._layer_names, self._maps(pl_module).values()):
                maps[layer] = metric.compute().cpu()  # collective under DDP: every rank computes
                metric.reset()
        kernels = {
            layer: mean_kernel(module.weight)
            for layer in self._layer_names
            if isinstance(module := pl_module.get_submodule(layer), nn.modules.conv._ConvNd) and module.weight.dim() > 2
        }
        values = self._values(maps, kernels, blind_spot)
        self.log_values(pl_module, values, stage)
        if self.pictures_due(trainer, stage):
            self.log_pictures(trainer, self._log_pictures, stage, maps, kernels, blind_spot)

    def _update_maps(self, pl_module: XAIMixin, probe: Tensor) -> None:
        device = next(iter(pl_module.parameters())).device  # type: ignore[attr-defined]
        metrics = list(self._maps(pl_module).values())
        for layer, metric in zip(self._layer_names, metrics):

            def hook(_module: nn.Module, _args: Any, output: Any, metric: MeanActivationMap = metric) -> None:
                value = output[0] if isinstance(output, (tuple, list)) else output
                metric.update(value)

            self.hooks.append(pl_module.get_submodule(layer).register_forward_hook(hook))  # type: ignore[attr-defined]
        with torch.no_grad():
            # a rank with an empty share still sizes its states (a zero-row forward), so the DDP sync matches
            for start in range(0, max(len(probe), 1), self.batch_size):
                pl_module.xai_forward(probe[start : start + self.batch_size].clone().to(device))
        self.remove_hooks()
        empty = [layer for layer, metric in zip(self._layer_names, metrics) if metric.map_sum.numel() == 0]
        if empty:
            raise XAIConfigurationError(
                f"{self.where}: the layers {empty} were not called in the forward pass (xai_forward); name layers "
                "that the forward runs."
            )

    def _blind_spot(self, pl_module: XAIMixin, probe: Tensor) -> Tensor | None:
        if self.blind_spot_stimulus is None:
            return None
        if self.blind_spot_canvas == "mean":
            canvas: Tensor | list[int] = probe.float().mean(0)
        else:
            canvas = list(probe.shape[1:])
        return blind_spot_map(
            pl_module,  # type: ignore[arg-type]
            self.blind_spot_stimulus,
            canvas,
            target=self.blind_spot_target,
            stride=self.blind_spot_stride,
            batch_size=self.batch_size,
        )

    def _values(
        self, maps: Mapping[str, Tensor], kernels: Mapping[str, Tensor], blind_spot: Tensor | None
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        for layer, mean_map in maps.items():
            if mean_map.dim() in (1, 2):
                for key, value in spatial_bias_statistics(mean_map).items():
                    values[f"{layer}/{key}"] = float(value)
        for layer, kernel in kernels.items():
            values[f"{layer}/kernel_lr_asymmetry"] = float(side_asymmetry(kernel, -1))
            if kernel.dim() == 2:
                values[f"{layer}/kernel_tb_asymmetry"] = float(side_asymmetry(kernel, -2))
        if self.uneven is not None:
            values["uneven_layers"] = float(len({u.path for u in self.uneven}))
        if blind_spot is not None:
            values["blind_spot/mean"] = float(blind_spot.mean())
            values["blind_spot/min"] = float(blind_spot.min())
        # a map without interior has no border ratio: kept out of the logs and of the checkpointed values
        return {key: value for key, value in values.items() if math.isfinite(value)}

    def _log_pictures(
        self,
        trainer: Trainer,
        stage: Stage,
        maps: Mapping[str, Tensor],
        kernels: Mapping[str, Tensor],
        blind_spot: Tensor | None,
    ) -> None:
        from lightning_xai import loggers
        from lightning_xai import visualization as pictures

        step = trainer.global_step
        when = f"{'test' if stage == 'test' else 'validation'}, epoch {trainer.current_epoch}"
        shown = {layer: m for layer, m in maps.items() if m.dim() in (1, 2)}
        if shown:
            title = f"mean |activation| per layer ({when}, {self.num_samples} probe samples)"
            loggers.log_image(trainer, self.key("mean_maps", stage), pictures.render_mean_maps(shown, title), step=step)
        if kernels:
            title = f"mean |w| kernel per layer ({when})"
            image = pictures.render_mean_kernels(kernels, title)
            loggers.log_image(trainer, self.key("mean_kernels", stage), image, step=step)
        if blind_spot is not None:
            target = "predicted class" if self.blind_spot_target is None else f"class {self.blind_spot_target}"
            title = f"p({target}) with the stimulus at each position ({when}); dark: missed"
            image = pictures.render_blind_spot_maps({self.blind_spot_canvas + " canvas": blind_spot}, title)
            loggers.log_image(trainer, self.key("blind_spot", stage), image, step=step)
