"""AttributionMetrics: attribution-quality metrics and pictures, logged every validation epoch."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_xai._contract import eval_mode, require_logits
from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai.attribution.methods import attribute
from lightning_xai.attribution.smooth_surrogate import SmoothOptions, smoothed
from lightning_xai.callbacks._base import EpochMetricCallback, Stage, picture_cadence
from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError
from lightning_xai.masks import masks_from_annotations
from lightning_xai.mixin import XAIMixin

# metric name -> (module, class): imported when used, so that an unused metric costs nothing
METRICS: dict[str, tuple[str, str]] = {
    "infidelity": ("lightning_xai.metrics.infidelity", "Infidelity"),
    "sensitivity_max": ("lightning_xai.metrics.sensitivity_max", "SensitivityMax"),
    "comprehensiveness": ("lightning_xai.metrics.comprehensiveness", "Comprehensiveness"),
    "sufficiency": ("lightning_xai.metrics.sufficiency", "Sufficiency"),
    "deletion_auc": ("lightning_xai.metrics.deletion_auc", "DeletionAUC"),
    "insertion_auc": ("lightning_xai.metrics.insertion_auc", "InsertionAUC"),
    "region_attribution_mass": ("lightning_xai.metrics.region_attribution_mass", "RegionAttributionMass"),
    "rationale_agreement": ("lightning_xai.metrics.rationale_agreement", "RationaleAgreement"),
    "randomization_sanity": ("lightning_xai.metrics.randomization_sanity", "RandomizationSanity"),
    "confidence_indication": ("lightning_xai.metrics.confidence_indication", "ConfidenceIndication"),
    "rationale_consistency": ("lightning_xai.metrics.rationale_consistency", "RationaleConsistency"),
    "dataset_consistency": ("lightning_xai.metrics.dataset_consistency", "DatasetConsistency"),
}
# Defaults sized to the cost budget (about 10 % of an epoch of the ColorDigits demo, measured by
# benchmarks/attribution_metrics_cost.py): one gradient and six forward passes per probe sample.
DEFAULT_METRICS = ("comprehensiveness",)


class _Logits(nn.Module):
    """The module metrics and Captum call: ``xai_forward`` for features, ``xai_forward_from_embeddings`` for text.

    For text, the probe batch's per-sample tensors (attention masks, lengths) are passed positionally, so
    that Captum expands them with its own path and perturbation batches. Metric kernels call the module
    without them; it then repeats each sample's entries for its consecutive perturbations, the order
    that infidelity and sensitivity use (as Captum's do).
    """

    def __init__(self, pl_module: XAIMixin, batch: Mapping[str, Any] | None = None, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.pl_module = pl_module
        self.batch = batch
        self.keys = keys

    def forward(self, inputs: Tensor, *extra: Any) -> Tensor:
        if self.batch is None:
            return self.pl_module.xai_forward(inputs)
        if extra:
            batch = {**self.batch, **dict(zip(self.keys, extra))}
        else:
            batch = _interleaved(self.batch, inputs.shape[0])
        output = self.pl_module.xai_forward_from_embeddings(inputs, batch)
        return require_logits(output, "AttributionMetrics", self.pl_module.xai_logits_key)


def _interleaved(batch: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """Repeats per-sample entries for ``rows // n`` consecutive copies of each sample."""
    n = next((v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), rows)
    if rows == n or rows % n:
        return dict(batch)
    times = rows // n
    return {
        key: value.repeat_interleave(times, dim=0) if isinstance(value, Tensor) and value.dim() > 0 else value
        for key, value in batch.items()
    }


class AttributionMetrics(EpochMetricCallback):
    """Computes attribution-quality metrics on a fixed probe set at the end of validation and test epochs.

    The probe set (``num_samples`` samples drawn with ``seed`` from the validation loader, or from
    ``dataset``) is explained with ``method`` and every metric is logged as ``attr/<name>/<metric>``. Under
    ``trainer.test()`` the probe comes from the test loader (or ``dataset``) and the keys are
    ``test/attr/<name>/<metric>``.
    It works inside ``fit`` (validation runs under ``no_grad``) and ``trainer.validate()`` (inference
    mode): attributions are computed on a clone inside ``torch.inference_mode(False)`` and
    ``torch.enable_grad()``, with the model in eval mode and its modes restored afterwards. Sanity-check
    passes are skipped. Under DDP each rank explains its own share of the probe set and the metric
    states are summed over ranks, so values are exact; pictures are logged by rank 0 after that.

    For text (integer token ids), inputs are the token embeddings from ``xai_embed`` and the model is
    ``xai_forward_from_embeddings``, so gradient methods, perturbations and masks act on embeddings.

    The defaults (Input x Gradient, 32 probe samples, comprehensiveness, pictures every 5 computations)
    keep the cost to about 10 % of an epoch of the ColorDigits demo. Every explanation and
    metric re-runs the model on the probe set: a heavier audit such as
    ``AttributionMetrics(method="integrated_gradients", num_samples=256, metrics=[...])`` costs several
    epochs' worth of compute, so raise ``every_n_epochs`` with it (``make bench`` measures both).

    Args:
        method: an attribution method of :func:`lightning_xai.attribution.attribute`.
        metrics: names from ``AttributionMetrics.METRICS``; defaults to comprehensiveness (each further
            faithfulness metric costs about as much again).
            ``region_attribution_mass`` and ``rationale_agreement`` read ``mask_key``.
            ``rationale_consistency`` compares with a randomly initialised copy of the model (or the
            ``reference`` of its ``metric_kwargs``); ``dataset_consistency`` draws its pairs from the probe set
            and, for text, gets the probe's token ids.
        num_samples: probe-set size.
        every_n_epochs: compute every this many epochs.
        pictures_every_n_epochs: log heatmaps (images) or highlighted tokens (text) through the trainer's
            loggers on the first computation and every this many after it (rendering costs time too); 0 never.
        num_images: how many probe samples the pictures show.
        mask_key: batch key of the region masks (forbidden regions or rationales).
        method_kwargs: options of the attribution method (``n_steps``, ``patch_size``, ...).
        metric_kwargs: per-metric constructor options, ``{"infidelity": {"n_perturb_samples": 20}}``.
        batch_size: probe samples explained per pass.
        target: explain the ``"label"`` or the model's ``"prediction"``.
        name: the log prefix, ``attr/<name>/...``; defaults to ``method``.
        seed: seed of the probe-set draw.
        token_decoder: turns a row of token ids into strings for the text pictures.
        dataset: draw the probe set from this dataset instead of the validation loader. Without a
            validation loop the metrics are then computed at the end of training epochs.
        log_images: deprecated; ``log_images=False`` is ``pictures_every_n_epochs=0``.
        images_every_n_epochs: deprecated name of ``pictures_every_n_epochs``.
        surrogate: explain the model's smooth surrogate, ``{"relu_beta": 10.0, "maxpool_tau": 10.0}`` (see
            :func:`~lightning_xai.attribution.smooth_surrogate`): every attribution (the probe's and the ones
            ``sensitivity_max`` and ``randomization_sanity`` recompute) is taken with ``nn.ReLU`` as
            ``Softplus(relu_beta)`` and max pooling as LogSumExp pooling (``maxpool_tau``), while the metrics'
            forward passes (infidelity, comprehensiveness, ...) run the model itself: they measure how well the
            surrogate's maps explain the model. The default name becomes ``<method>_surrogate``.

    Examples:
        >>> callback = AttributionMetrics(method="saliency", metrics=["comprehensiveness"], num_samples=16)
        >>> callback.state_key
        "AttributionMetrics{'name': 'saliency'}"
    """

    METRICS = METRICS
    requires_mixin: ClassVar[bool] = True

    def __init__(
        self,
        method: str = "input_x_gradient",
        metrics: list[str] | None = None,
        num_samples: int = 32,
        every_n_epochs: int = 1,
        pictures_every_n_epochs: int = 5,
        num_images: int = 8,
        mask_key: str = "mask",
        method_kwargs: dict[str, Any] | None = None,
        metric_kwargs: dict[str, dict[str, Any]] | None = None,
        batch_size: int = 64,
        target: Literal["label", "prediction"] = "label",
        name: str | None = None,
        seed: int = 0,
        token_decoder: Callable[[list[int]], list[str]] | None = None,
        dataset: Dataset | None = None,
        log_images: bool | None = None,
        images_every_n_epochs: int | None = None,
        surrogate: Mapping[str, float | None] | None = None,
    ) -> None:
        pictures_every_n_epochs = picture_cadence(
            "AttributionMetrics",
            pictures_every_n_epochs,
            log_images=log_images,
            images_every_n_epochs=images_every_n_epochs,
        )
        super().__init__(name=name, every_n_epochs=every_n_epochs, pictures_every_n_epochs=pictures_every_n_epochs)
        self.metrics = list(DEFAULT_METRICS if metrics is None else metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise XAIConfigurationError(f"AttributionMetrics: unknown metrics {unknown}; available: {sorted(METRICS)}.")
        if min(num_samples, batch_size) < 1:
            raise XAIConfigurationError("AttributionMetrics: num_samples and batch_size must be >= 1.")
        if target not in ("label", "prediction"):
            raise XAIConfigurationError(f"AttributionMetrics: target must be 'label' or 'prediction', got {target!r}.")
        self.method = method
        self.num_samples = num_samples
        self.num_images = num_images
        self.mask_key = mask_key
        self.method_kwargs = dict(method_kwargs or {})
        self.metric_kwargs = {k: dict(v) for k, v in (metric_kwargs or {}).items()}
        self.batch_size = batch_size
        self.target = target
        self.seed = seed
        self.token_decoder = token_decoder
        self.dataset = dataset
        #: smoothing of the explained model (None: the model itself)
        self.surrogate = None if surrogate is None else SmoothOptions.from_mapping(surrogate, "AttributionMetrics")
        self._probes: dict[Stage, dict[str, Any]] = {}

    def default_name(self) -> str:
        return self.method if self.surrogate is None else f"{self.method}_surrogate"

    def _explained(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """``model`` as the explanations see it: its smooth surrogate (in place, for the block) or itself."""
        if self.surrogate is None:
            return contextlib.nullcontext(model)
        return smoothed(model, self.surrogate.relu_beta, self.surrogate.maxpool_tau)

    @property
    def log_prefix(self) -> str:
        return f"attr/{self.name}"

    @property
    def _attribute_name(self) -> str:
        return "xai_attribution_metrics_" + "".join(c if c.isalnum() else "_" for c in self.name)

    # ------------------------------------------------------------------------------------- setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        with self._explained(pl_module):
            pass  # a model with nothing to smooth fails here, not at the end of the first epoch
        if not hasattr(pl_module, self._attribute_name):
            metrics = {}
            for metric_name in self.metrics:
                module_name, class_name = METRICS[metric_name]
                metric_class = getattr(importlib.import_module(module_name), class_name)
                options = dict(self.metric_kwargs.get(metric_name, {}))
                if metric_name == "sensitivity_max":
                    # the callback's attributions come from the same method as its explain_fn
                    options.setdefault("reuse_attributions", True)
                metrics[metric_name] = metric_class(**options)
            # A logged Metric must be an attribute of the LightningModule (device moves, DDP sync).
            pl_module.add_module(self._attribute_name, nn.ModuleDict(metrics))

    def _metrics(self, pl_module: LightningModule) -> nn.ModuleDict:
        return getattr(pl_module, self._attribute_name)

    # ------------------------------------------------------------------------------------- probe

    def _build_probe(self, trainer: Trainer, pl_module: XAIMixin, stage: Stage) -> dict[str, Any]:
        loader = self.probe_loader(trainer, stage, self.batch_size)
        pool: list[Mapping[str, Any]] = []
        collected = 0
        for batch in loader:
            data = pl_module.xai_batch(batch)
            if "input" not in data:
                raise MissingBatchKeyError(
                    f"AttributionMetrics needs the batch key 'input', but the batch has {sorted(data)}; override "
                    "xai_batch()."
                )
            pool.append(data)
            collected += int(data["input"].shape[0])
            if collected >= 4 * self.num_samples:
                break
        inputs = torch.cat([d["input"] for d in pool]).clone()
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(inputs.shape[0], generator=generator)[: self.num_samples].sort().values
        probe: dict[str, Any] = {"input": inputs[chosen]}
        if all("target" in d for d in pool):
            probe["target"] = torch.cat([torch.as_tensor(d["target"]) for d in pool]).clone()[chosen]
        needs_mask = any("mask" in getattr(self._metrics(pl_module)[m], "requires", ()) for m in self.metrics)
        if needs_mask:
            if not all(self.mask_key in d for d in pool):
                raise MissingBatchKeyError(
                    f"AttributionMetrics(metrics={self.metrics}) needs the batch key {self.mask_key!r} for its "
                    f"region metrics, but the validation batches have {sorted(pool[0])}. Set mask_key= or add it."
                )
            masks = [masks_from_annotations(d[self.mask_key], d["input"])[0] for d in pool]
            probe["mask"] = torch.cat([m.expand(d["input"].shape[0], *m.shape[1:]) for m, d in zip(masks, pool)])[
                chosen
            ].clone()
        extras = {
            key: torch.cat([d[key] for d in pool]).clone()[chosen]
            for key in pool[0]
            if key not in ("input", "target", "mask", self.mask_key)
            and all(isinstance(d.get(key), Tensor) and d[key].dim() > 0 for d in pool)
        }
        probe["extras"] = extras
        if not inputs.is_floating_point():
            # Text is explained on (N, T, E) embeddings: faithfulness metrics remove whole tokens (ERASER).
            for metric_name, metric in self._metrics(pl_module).items():
                if hasattr(metric, "feature_dims") and "feature_dims" not in self.metric_kwargs.get(metric_name, {}):
                    metric.feature_dims = (1,)
        return probe

    # ------------------------------------------------------------------------------------- hooks

    @override
    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        assert isinstance(pl_module, XAIMixin)
        with torch.inference_mode(False), torch.enable_grad():
            if stage not in self._probes:
                self._probes[stage] = self._build_probe(trainer, pl_module, stage)
            with eval_mode(pl_module):
                pictures = self._update_metrics(pl_module, self._probes[stage])
            # reset() re-creates the states: outside this block, validate() would make them inference tensors
            values = {}
            for metric_name, metric in self._metrics(pl_module).items():
                values[metric_name] = metric.compute()  # collective under DDP: every rank computes
                metric.reset()
        self.log_values(pl_module, values, stage)
        if pictures is not None and self.pictures_due(trainer, stage):
            self.log_pictures(trainer, self._log_pictures, stage, *pictures)

    def _update_metrics(self, pl_module: XAIMixin, probe: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor] | None:
        device = next(iter(pl_module.parameters())).device  # type: ignore[attr-defined]
        metrics = self._metrics(pl_module)
        total = probe["input"].shape[0]
        pictures = None
        for start in range(0, total, self.batch_size):
            rows = slice(start, start + self.batch_size)
            raw_inputs = probe["input"][rows].clone().to(device)
            extras = {k: v[rows].clone().to(device) for k, v in probe["extras"].items()}
            keys = tuple(extras)
            if raw_inputs.is_floating_point():
                model: nn.Module = _Logits(pl_module)
                inputs = raw_inputs
            else:
                model = _Logits(pl_module, {"input": raw_inputs, **extras}, keys)
                inputs = pl_module.xai_embed(raw_inputs).detach()
            forward_args = tuple(extras.values()) if not raw_inputs.is_floating_point() else ()
            if self.target == "label" and "target" in probe:
                target = probe["target"][rows].clone().to(device).long()
            else:
                with torch.no_grad():
                    target = model(inputs).argmax(-1)
            with self._explained(model):
                attributions = attribute(
                    self.method,
                    model,
                    inputs,
                    target,
                    additional_forward_args=forward_args or None,
                    **self.method_kwargs,
                ).detach()
            mask = probe["mask"][rows].clone().to(device) if "mask" in probe else None

            def explain(
                explained_model: nn.Module, explained: Tensor, explained_target: Tensor, forward_args=forward_args
            ) -> Tensor:
                # perturbed batches hold consecutive copies of each sample: give Captum matching rows
                copies = {str(i): a for i, a in enumerate(forward_args)}
                expanded = tuple(_interleaved(copies, explained.shape[0]).values()) if forward_args else ()
                with self._explained(explained_model):
                    return attribute(
                        self.method,
                        explained_model,
                        explained,
                        explained_target,
                        additional_forward_args=expanded or None,
                        **self.method_kwargs,
                    )

            for metric in metrics.values():
                # text: metrics that need the vocabulary (dataset consistency) get the probe's token ids
                text = not raw_inputs.is_floating_point()
                ids = {"token_ids": raw_inputs} if text and getattr(metric, "takes_token_ids", False) else {}
                metric.update(inputs, attributions, target, model=model, explain_fn=explain, mask=mask, **ids)
            if pictures is None:
                shown = slice(0, self.num_images)
                pictures = (raw_inputs[shown].detach().cpu(), attributions[shown].cpu(), target[shown].cpu())
        return pictures

    def _log_pictures(
        self, trainer: Trainer, stage: Stage, inputs: Tensor, attributions: Tensor, target: Tensor
    ) -> None:
        from lightning_xai import loggers, visualization

        step = trainer.global_step
        titles = [f"class {int(t)}" for t in target]
        if inputs.is_floating_point() and inputs.dim() >= 3:
            image = visualization.render_heatmaps(inputs, attributions, titles=titles, max_images=self.num_images)
            loggers.log_image(trainer, self.key("heatmaps", stage), image, step=step)
        elif not inputs.is_floating_point():
            scores = attributions.sum(-1)
            decode = self.token_decoder or (lambda ids: [str(i) for i in ids])
            rows = [decode(row.tolist()) for row in inputs]
            html = "".join(
                f"<p>{visualization.highlight_tokens_html(tokens, row.tolist())}</p>"
                for tokens, row in zip(rows, scores)
            )
            loggers.log_html(trainer, self.key("tokens", stage), html, step=step)
            loggers.log_image(
                trainer,
                self.key("tokens", stage),
                visualization.render_tokens_png(rows, [s.tolist() for s in scores]),
                step=step,
            )
