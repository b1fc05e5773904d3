"""ConceptEffect: per-epoch concept-probe accuracy and TReATE / ATE_gt / CONEXP estimates of a concept's effect."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_xai._contract import (
    LOGITS_KEY,
    batch_rows,
    batch_view,
    capture_output,
    check_name,
    forward_logits,
    logits_of,
    named_submodule,
    rows_of,
)
from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai.callbacks._base import EpochMetricCallback, Stage
from lightning_xai.callbacks._concept_head import select_features
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._labels import class_labels
from lightning_xai.functional.concepts import (
    Distance,
    EffectEstimate,
    Pooling,
    ate_ground_truth,
    conexp,
    linear_probe_accuracy,
    pool,
    treate,
)
from lightning_xai.functional.fairness import as_probabilities

# rows are (N, D) features, (N,) labels or (N, C) probabilities; concept labels gather as integers
_MAX_ROW_DIMS = 3
_ROW_DTYPES = {"concept": torch.long}


class ConceptEffect(EpochMetricCallback):
    """Measures, every validation and test epoch, how decodable a concept still is and how much it moves predictions.

    During validation a forward hook reads ``layer``'s output (pooled as the concept heads pool it), the
    batch's ``concept_key`` labels and the module's predictions. At the end of the epoch the callback logs,
    under ``concept/<name>/``:

    * ``probe_accuracy`` and ``probe_majority``: held-out accuracy of a **fresh** logistic-regression probe
      trained on the frozen representation, next to the majority-class rate (an adversarial head at chance
      can leave the concept decodable; the fresh probe is the honest number);
    * with ``reference_model``: ``treate``, ``mean_x d(p_ref(x), p(x))`` (CausaLM's TReATE when the module is
      the classifier on the counterfactual encoder and ``reference_model`` the one on the original encoder),
      and for binary concepts ``treate_flip``, the same rescaled to the effect of flipping the concept, the
      scale of ``ate_gt`` (see :func:`~lightning_xai.functional.treate`);
    * with ``counterfactual_key`` in the batch: ``ate_gt``, ``mean_x d(p(x), p(x_cf))`` of the explained model
      (``reference_model`` if given, else the module);
    * ``conexp``: ``d(E[p | C=1], E[p | C=0])`` of the explained model, the observational baseline (binary
      concepts);
    * the bounds of each estimate's normal-approximation ``confidence`` interval as ``<estimate>_low`` /
      ``<estimate>_high``.

    Under DDP the collected rows are gathered from all ranks before estimating, so every rank logs the
    global values. The sanity check is skipped. Under ``trainer.test()`` the keys are ``test/concept/<name>/...``.

    Args:
        layer: dotted name of the submodule whose output is the representation to probe.
        concept_key: batch key of the concept labels ``(N,)`` (or ``(N, T)`` with ``pooling="none"``).
        reference_model: the model whose effect is estimated against this one (called on the batch input).
        counterfactual_key: batch key of counterfactual inputs (the concept changed, all else equal).
        distance: ``"tv"`` (total variation), ``"class"`` (``|delta p|`` of ``class_index``) or ``"l2"``.
        class_index: the class of the ``"class"`` distance.
        confidence: level of the intervals.
        pooling: ``"mean"``, ``"cls"`` or ``"none"``.
        selector: tuple index or attribute of the layer output holding the features.
        attention_mask_key: batch key of the attention mask for mean pooling.
        max_probe_rows: the probe uses at most this many (first) rows.
        probe_seed: seed of the probe's train/held-out split.
        name: log name; default ``concept_key``.
        every_n_epochs: compute every this many epochs of ``fit``.

    Examples:
        >>> callback = ConceptEffect(layer="encoder", concept_key="gender")
        >>> callback.state_key
        "ConceptEffect{'name': 'gender'}"
    """

    def __init__(
        self,
        layer: str,
        concept_key: str,
        reference_model: nn.Module | None = None,
        counterfactual_key: str = "counterfactual_input",
        distance: Distance = "tv",
        class_index: int = 1,
        confidence: float = 0.95,
        pooling: Pooling = "mean",
        selector: int | str | None = None,
        attention_mask_key: str = "attention_mask",
        max_probe_rows: int = 20000,
        probe_seed: int = 0,
        name: str | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        super().__init__(name=name, every_n_epochs=every_n_epochs, pictures_every_n_epochs=0)
        if distance not in ("tv", "class", "l2"):
            raise XAIConfigurationError(f"ConceptEffect: distance must be 'tv', 'class' or 'l2', got {distance!r}.")
        self.layer = layer
        self.concept_key = concept_key
        self.reference_model = reference_model
        self.counterfactual_key = counterfactual_key
        self.distance: Distance = distance
        self.class_index = class_index
        self.confidence = confidence
        self.pooling: Pooling = pooling
        self.selector = selector
        self.attention_mask_key = attention_mask_key
        self.max_probe_rows = max_probe_rows
        self.probe_seed = probe_seed
        check_name(self.name, "name (by default the concept_key)", "ConceptEffect")
        self._rows: dict[str, list[Tensor]] = {}
        self._store: dict[str, Any] = {}

    def default_name(self) -> str:
        return self.concept_key

    @property
    def log_prefix(self) -> str:
        return f"concept/{self.name}"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        named_submodule(pl_module, self.layer, self.where)
        self.refuse_compiled(pl_module, f"the output of layer {self.layer!r}")
        if self.reference_model is not None:
            self.reference_model.to(pl_module.device).eval()

    @override
    def epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        self._rows = {key: [] for key in ("features", "concept", "probs", "reference", "reference_cf", "self_cf")}

    @override
    def batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        data = batch_view(pl_module, batch)
        self._store = store = {"data": data}
        key = getattr(pl_module, "xai_logits_key", LOGITS_KEY)
        rows = batch_rows(data)
        self.hooks.append(capture_output(pl_module.get_submodule(self.layer), store, "layer"))
        self.hooks.append(
            capture_output(
                pl_module,
                store,
                "logits",
                select=lambda output: logits_of(output, key),
                accept=rows_of(lambda: rows) if rows is not None else None,
            )
        )

    def _forward(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return forward_logits(model, inputs, self.where)

    @override
    def batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        if "data" not in self._store:
            return
        store, data = self._store, self._store["data"]
        if self.concept_key not in data:
            raise XAIConfigurationError(
                f"ConceptEffect needs the batch key {self.concept_key!r}, but the batch has {sorted(data)}."
            )
        inputs = data.get("input")
        if "layer" not in store or "logits" not in store:
            # the validation step did not call the module on the batch: run it once, with the layer hooked
            if not isinstance(inputs, Tensor):
                raise XAIConfigurationError("ConceptEffect: the batch has no tensor 'input' to run the model on.")
            captured: dict[str, Any] = {}
            handle = capture_output(pl_module.get_submodule(self.layer), captured, "layer")
            try:
                logits = self._forward(pl_module, inputs)
            finally:
                handle.remove()
            store.setdefault("logits", logits)
            store.setdefault("layer", captured.get("layer"))
        features = select_features(store["layer"], self.selector, self.where)
        mask = data.get(self.attention_mask_key)
        features = pool(features.detach().float(), self.pooling, mask if isinstance(mask, Tensor) else None)
        concept = class_labels(
            torch.as_tensor(data[self.concept_key]), None, f"{self.where}: batch[{self.concept_key!r}]"
        ).to(features.device)
        rows = self._rows
        rows["features"].append(features.reshape(-1, features.shape[-1]))
        rows["concept"].append(concept.reshape(-1))
        probs = as_probabilities(store["logits"].detach())
        rows["probs"].append(probs)
        counterfactual = data.get(self.counterfactual_key)
        if self.reference_model is not None and isinstance(inputs, Tensor):
            rows["reference"].append(as_probabilities(self._forward(self.reference_model, inputs)))
            if isinstance(counterfactual, Tensor):
                rows["reference_cf"].append(as_probabilities(self._forward(self.reference_model, counterfactual)))
        elif isinstance(counterfactual, Tensor):
            rows["self_cf"].append(as_probabilities(self._forward(pl_module, counterfactual)))
        self._store = {}

    def _gathered(self, pl_module: LightningModule, key: str) -> Tensor | None:
        """The ``key`` rows of every rank, in rank order; ``None`` when no rank holds any.

        Every rank enters the same two collectives whatever it holds (a rank without validation batches holds no
        rows): first each rank's row count and row shape, then its rows padded to the longest. Every decision
        after that is taken from gathered numbers, so ranks cannot part ways and wait for each other forever.
        """
        parts = self._rows.get(key) or []
        local = torch.cat(parts) if parts else None
        trainer = pl_module.trainer
        if trainer.world_size == 1:
            return local
        header = torch.full((1 + _MAX_ROW_DIMS,), -1, dtype=torch.long)
        if local is not None:
            if local.dim() - 1 > _MAX_ROW_DIMS:
                raise XAIConfigurationError(f"{self.where}: {key} rows have shape {tuple(local.shape)}.")
            header[: local.dim()] = torch.tensor(local.shape)
        else:
            header[0] = 0
        headers = pl_module.all_gather(header.to(pl_module.device)).reshape(trainer.world_size, -1).cpu()
        counts = headers[:, 0]
        if int(counts.sum()) == 0:
            return None
        shapes = {tuple(int(d) for d in row[1:] if d >= 0) for row in headers if row[0] > 0}
        if len(shapes) != 1:
            raise XAIConfigurationError(
                f"{self.where}: the ranks hold {key} rows of different shapes {sorted(shapes)}."
            )
        (width,) = shapes
        dtype = _ROW_DTYPES.get(key, torch.float32)
        padded = torch.zeros((int(counts.max()), *width), dtype=dtype, device=pl_module.device)
        if local is not None:
            padded[: local.shape[0]] = local.to(device=pl_module.device, dtype=dtype)
        gathered = pl_module.all_gather(padded)
        return torch.cat([gathered[rank, : int(n)] for rank, n in enumerate(counts.tolist())])

    @override
    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        features = self._gathered(pl_module, "features")  # every rank gathers, with rows or without
        if features is None:
            return
        concept = self._gathered(pl_module, "concept")
        probs = self._gathered(pl_module, "probs")
        reference = self._gathered(pl_module, "reference")
        values: dict[str, float] = {}
        limit = self.max_probe_rows
        accuracy, majority = linear_probe_accuracy(features[:limit].cpu(), concept[:limit].cpu(), seed=self.probe_seed)
        values["probe_accuracy"], values["probe_majority"] = accuracy, majority
        estimates: dict[str, EffectEstimate] = {}
        explained = reference if reference is not None else probs
        kwargs = {"distance": self.distance, "class_index": self.class_index, "confidence": self.confidence}
        binary = None  # the per-example value of a binary concept (token-level concepts have none)
        if self.pooling != "none" and concept.unique().numel() == 2:
            binary = (concept == concept.max()).long().cpu()
        if reference is not None:
            estimates["treate"] = treate(reference.cpu(), probs.cpu(), **kwargs)
            if binary is not None:
                estimates["treate_flip"] = treate(
                    reference.cpu(), probs.cpu(), concept=binary, contrast="flip", **kwargs
                )
        counterfactual = self._gathered(pl_module, "reference_cf" if reference is not None else "self_cf")
        if counterfactual is not None:
            estimates["ate_gt"] = ate_ground_truth(explained.cpu(), counterfactual.cpu(), **kwargs)
        if binary is not None:
            estimates["conexp"] = conexp(explained.cpu(), binary.bool(), **kwargs)
        for key, estimate in estimates.items():
            values[key], values[f"{key}_low"], values[f"{key}_high"] = estimate.value, estimate.low, estimate.high
        self.log_values(pl_module, values, stage)
