"""NeuronMonitor: TX-Ray's per-neuron feature distributions, how training moves them, and pruning by them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.data import Dataset, Subset
from typing_extensions import override

from lightning_xai._contract import eval_mode, named_submodule
from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai.callbacks._base import EpochMetricCallback, Stage
from lightning_xai.callbacks._neuron_pruning import neuron_pruning_method
from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError
from lightning_xai.functional.neurons import (
    CREDIT_MODES,
    NEURON_SCORES,
    CreditMode,
    dead_neurons,
    filter_redundancy,
    hellinger_distance,
    layer_positions,
    length_shift,
    lowest_scored,
    neuron_length,
    neuron_scores,
    prune_neurons,
    top_features,
)
from lightning_xai.metrics.neuron_activation_stats import NeuronActivationStats
from lightning_xai.mixin import XAIMixin


def _nanmean(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.double().mean()) if finite.numel() else math.nan


def _sparse(mass: Tensor) -> dict[str, Any]:
    # masses are mostly zero (a neuron wins on few features): checkpoints keep the non-zero entries only
    flat = mass.detach().cpu().flatten()
    index = flat.nonzero().flatten()
    return {"shape": list(mass.shape), "index": index, "value": flat[index].clone()}


def _dense(stored: Mapping[str, Any]) -> Tensor:
    flat = torch.zeros(math.prod(stored["shape"]))
    flat[stored["index"]] = stored["value"].float()
    return flat.view(*stored["shape"])


class NeuronMonitor(EpochMetricCallback):
    """TX-Ray (Rethmeier et al., UAI 2020) as a callback: what each neuron of named layers responds to.

    Every computed validation epoch, one no-grad forward over a fixed probe set credits each position's
    activation to neurons (``mode="max"``: TX-Ray's max-1, each position to its most activated neuron;
    ``"topk"``: each neuron's ``k`` strongest positions per sample) and sums it per neuron and input feature (token
    id by default; any ``(batch,)`` or ``(batch, length)`` batch key, e.g. labels or POS tags). The sums are
    torchmetrics states (:class:`~lightning_xai.metrics.NeuronActivationStats`), exact under DDP. Logged per
    layer, as ``neurons/<layer>/<key>``:

    * ``hellinger_previous``: mean Hellinger distance of each neuron's feature distribution to the previous
      computation's (how much an epoch of training moved it);
    * ``hellinger_reference``: the same against the reference, the checkpoint training started from
      (``reference="start"``, measured before the first step; or a checkpoint path): pretraining vs fine-tuning
      is TX-Ray's transfer question;
    * ``dead_share``: the share of neurons credited with nothing on the probe set;
    * ``mean_length``: mean neuron length (distinct features) of the live neurons; ``length_shift``: mean length
      now minus at the reference (negative: neurons specialised);
    * ``redundancy``: mean Jaccard overlap of the feature sets of two live neurons.

    Means are over the neurons alive at both stages compared. Under ``trainer.test()`` the probe comes from the
    test loader and only ``dead_share``, ``mean_length`` and ``redundancy`` are logged (``test/neurons/...``):
    distances between distributions measured on different data would mix data with training.

    Pictures (on the picture cadence): a table of each layer's strongest neurons with their top features, and a
    histogram of the Hellinger distances per layer.

    Pruning: :meth:`scores` gives TX-Ray's per-neuron importance (``"mass"``: the neuron's share of the layer's
    maximal activation on the probe data; ``"transfer"``: its Hellinger distance to the reference);
    :meth:`pruning_method` plugs them into Lightning's ``ModelPruning`` (``pruning_fn=``), and :meth:`prune`
    prunes inline with forward hooks.

    Args:
        layers: names of the monitored submodules (``model.named_modules()``): Conv1d/2d, LSTM/GRU, Linear, Hugging
            Face encoder layers; a neuron is a channel, a hidden unit or an output feature.
        num_features: the number of distinct features; by default the ``num_embeddings`` of the module's first
            ``nn.Embedding`` when the features are the input token ids.
        feature_key: the :meth:`~lightning_xai.XAIMixin.xai_batch` key of the features (``"input"``: token ids;
            ``"target"``: the sample's label at every position).
        mode: ``"max"`` or ``"topk"``.
        k: positions per neuron and sample in ``"topk"`` mode.
        ignore_index: a feature value that is never credited (the padding token id).
        valid_key: a batch key of ``(batch, length)`` booleans (an attention mask); positions where it is 0 are not
            credited.
        num_samples: probe-set size (split over DDP ranks).
        batch_size: probe samples per forward when ``dataset`` is given.
        reference: ``"start"`` (the weights ``fit`` starts from), a checkpoint path (its ``state_dict``, loaded with
            ``weights_only=True``), or ``None``.
        feature_names: names of the features for the table (a vocabulary); ids otherwise.
        top_k_features: features per neuron in the table.
        table_neurons: neurons per layer in the table (the largest mass first).
        every_n_epochs: compute every this many epochs.
        pictures_every_n_epochs: log the table and histogram on the first computation and every this many; 0 never.
        dataset: draw the probe set from this dataset instead of the validation (test) loader: the training data, for
            pruning scores that do not look at the data pruning is judged on.
        collate_fn: batches ``dataset``'s samples (padding variable-length text); PyTorch's default otherwise.
        name: the callback's name (``neurons/<name>/...`` keys when given).

    Example:
        >>> monitor = NeuronMonitor(layers=["conv"], ignore_index=0, num_samples=256)
        >>> monitor.key("conv/dead_share")
        'neurons/conv/dead_share'
    """

    requires_mixin: ClassVar[bool] = True
    mixin_use: ClassVar[str] = "reads probe batches through XAIMixin.xai_batch"
    SCORES = NEURON_SCORES

    def __init__(
        self,
        layers: list[str],
        num_features: int | None = None,
        feature_key: str = "input",
        mode: CreditMode = "max",
        k: int = 1,
        ignore_index: int | None = None,
        valid_key: str | None = None,
        num_samples: int = 512,
        batch_size: int = 64,
        reference: str | None = "start",
        feature_names: list[str] | None = None,
        top_k_features: int = 8,
        table_neurons: int = 32,
        every_n_epochs: int = 1,
        pictures_every_n_epochs: int = 5,
        dataset: Dataset | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, every_n_epochs=every_n_epochs, pictures_every_n_epochs=pictures_every_n_epochs)
        if not layers or not all(isinstance(layer, str) and layer for layer in layers):
            raise XAIConfigurationError(f"NeuronMonitor: layers must be non-empty submodule names, got {layers!r}.")
        if mode not in CREDIT_MODES:
            raise XAIConfigurationError(f"NeuronMonitor: unknown mode {mode!r}; available: {sorted(CREDIT_MODES)}.")
        if min(k, num_samples, batch_size, top_k_features, table_neurons) < 1:
            raise XAIConfigurationError(
                "NeuronMonitor: k, num_samples, batch_size, top_k_features and table_neurons must be >= 1."
            )
        if num_features is not None and num_features < 1:
            raise XAIConfigurationError(f"NeuronMonitor: num_features must be >= 1, got {num_features}.")
        self.layers = list(dict.fromkeys(layers))
        self.num_features = num_features
        self.feature_key = feature_key
        self.mode = mode
        self.k = int(k)
        self.ignore_index = ignore_index
        self.valid_key = valid_key
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.reference = reference
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.top_k_features = int(top_k_features)
        self.table_neurons = int(table_neurons)
        self.dataset = dataset
        self.collate_fn = collate_fn
        #: the latest feature counts per stage and layer: ``counts["validate"]["conv"].mass``
        self.counts: dict[str, dict[str, Any]] = {}
        self._reference: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._modules: dict[str, nn.Module] = {}
        self._stats: dict[str, NeuronActivationStats] = {}
        self._probes: dict[Stage, list[dict[str, Any]]] = {}
        self._features: tuple[Tensor, Tensor | None] | None = None
        self._pruning_hooks: dict[str, Any] = {}

    def default_name(self) -> str:
        return "neurons"

    @property
    def log_prefix(self) -> str:
        return "neurons" if self._name is None else f"neurons/{self._name}"

    # ------------------------------------------------------------------------------------- setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.refuse_compiled(pl_module, "layer activations")
        self._modules = {layer: named_submodule(pl_module, layer, self.where) for layer in self.layers}
        if self.num_features is None:
            embedding = next((m for m in pl_module.modules() if isinstance(m, nn.Embedding)), None)
            if self.feature_key != "input" or embedding is None:
                raise XAIConfigurationError(
                    f"{self.where} cannot infer the number of features for feature_key={self.feature_key!r}"
                    f"{'' if embedding else ' (the module has no nn.Embedding)'}: pass num_features= (the vocabulary "
                    "size, tag-set size or class count)."
                )
            self.num_features = int(embedding.num_embeddings)

    # ------------------------------------------------------------------------------------- probe

    def _loader(self, trainer: Trainer, stage: Stage) -> tuple[Any, int]:
        """The probe's loader and how many samples this rank takes from it."""
        world, rank = trainer.world_size, trainer.global_rank
        if self.dataset is not None:
            # every rank takes its own stride of the same first num_samples: the union is one process's probe
            indices = list(range(min(self.num_samples, len(self.dataset))))[rank::world]  # type: ignore[arg-type]
            subset = Subset(self.dataset, indices)
            return self.probe_loader(trainer, stage, self.batch_size, subset, self.collate_fn), len(indices)
        return self.probe_loader(trainer, stage, self.batch_size), math.ceil(self.num_samples / world)

    def _probe(self, trainer: Trainer, pl_module: XAIMixin, stage: Stage) -> list[dict[str, Any]]:
        if stage in self._probes:
            return self._probes[stage]
        loader, quota = self._loader(trainer, stage)
        probe: list[dict[str, Any]] = []
        taken = 0
        for batch in loader:
            if taken >= quota:
                break
            data = dict(pl_module.xai_batch(batch))
            for key in ("input", self.feature_key, *((self.valid_key,) if self.valid_key else ())):
                if not isinstance(data.get(key), Tensor):
                    raise MissingBatchKeyError(
                        f"{self.where} needs the batch key {key!r} (a tensor), but the batch has {sorted(data)}; set "
                        "feature_key= / valid_key= or override xai_batch()."
                    )
            rows = min(int(data["input"].shape[0]), quota - taken)
            sized = int(data["input"].shape[0])
            probe.append(
                {
                    key: value[:rows].detach().clone().cpu()
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == sized
                    else value
                    for key, value in data.items()
                }
            )
            taken += rows
        if trainer.world_size > 1:
            # a rank without probe data would skip the metric sync the others wait in: fail on every rank
            sizes = trainer.strategy.all_gather(torch.tensor(taken, device=pl_module.device))  # type: ignore[attr-defined]
            if int(sizes.min()) == 0:
                raise XAIConfigurationError(
                    f"{self.where}: some DDP rank has no probe samples ({sizes.tolist()}); raise num_samples or give "
                    "every rank validation data."
                )
        elif taken == 0:
            raise XAIConfigurationError(f"{self.where}: the probe loader gave no samples.")
        self._probes[stage] = probe
        return probe

    # ------------------------------------------------------------------------------------- measuring

    def _record(self, layer: str) -> Any:
        def hook(module: nn.Module, _: Any, output: Any) -> None:
            assert self._features is not None
            activations = layer_positions(module, output)
            stats = self._stats.get(layer)
            if stats is None or stats.num_neurons != activations.shape[-1]:
                stats = NeuronActivationStats(activations.shape[-1], int(self.num_features or 1), self.mode, self.k)
                self._stats[layer] = stats
            features, valid = self._features
            stats.to(activations.device).update(activations, features, valid)

        return hook

    def _forward(self, pl_module: XAIMixin, data: Mapping[str, Any], device: torch.device) -> None:
        batch = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in data.items()}
        inputs = batch["input"]
        features = batch[self.feature_key]
        valid = batch[self.valid_key].bool() if self.valid_key else None
        if self.ignore_index is not None and features.dim() > 1:
            keep = features != self.ignore_index
            valid = keep if valid is None else valid & keep
        self._features = (features, valid)
        if not inputs.is_floating_point() and type(pl_module).xai_embed is not XAIMixin.xai_embed:
            pl_module.xai_forward_from_embeddings(pl_module.xai_embed(inputs), batch)
        else:
            pl_module.xai_forward(inputs)

    def measure(self, trainer: Trainer, pl_module: LightningModule, stage: Stage = "validate") -> dict[str, Any]:
        """Counts over the probe set of ``stage`` with the module's current weights, kept in :attr:`counts` (which
        :meth:`scores` reads); a collective under DDP."""
        assert isinstance(pl_module, XAIMixin)
        probe = self._probe(trainer, pl_module, stage)
        device = next(iter(pl_module.parameters())).device
        handles = [self._modules[layer].register_forward_hook(self._record(layer)) for layer in self.layers]
        try:
            # states made under validate()'s inference mode could not be updated in place later
            with eval_mode(pl_module), torch.inference_mode(False), torch.no_grad():
                for stats in self._stats.values():
                    stats.reset()
                for data in probe:
                    self._forward(pl_module, data, device)
        finally:
            for handle in handles:
                handle.remove()
            self._features = None
        missing = [layer for layer in self.layers if layer not in self._stats]
        if missing:
            raise XAIConfigurationError(
                f"{self.where}: the layers {missing} did not run in the probe forward; monitor layers that the "
                "module's xai_forward (or xai_forward_from_embeddings) calls."
            )
        with torch.inference_mode(False):
            counts = {layer: self._stats[layer].compute() for layer in self.layers}
            for stats in self._stats.values():
                stats.reset()
        self.counts[stage] = counts
        return counts

    def _with_weights(self, trainer: Trainer, pl_module: LightningModule, state_dict: Mapping[str, Tensor]) -> dict:
        current = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}
        try:
            pl_module.load_state_dict(state_dict, strict=False)
            return self.measure(trainer, pl_module, "validate")
        finally:
            pl_module.load_state_dict(current)

    def _ensure_reference(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._reference or self.reference is None:
            return
        if self.reference == "start":
            if trainer.state.fn != "fit":
                return
            counts = self.measure(trainer, pl_module, "validate")
        else:
            checkpoint = torch.load(self.reference, map_location="cpu", weights_only=True)
            counts = self._with_weights(trainer, pl_module, checkpoint.get("state_dict", checkpoint))
        self._reference = {layer: c.mass.cpu() for layer, c in counts.items()}

    # ------------------------------------------------------------------------------------- hooks

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.dataset is not None or trainer.val_dataloaders is not None:
            self._ensure_reference(trainer, pl_module)

    @override
    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        if stage == "validate":
            self._ensure_reference(trainer, pl_module)
        counts = self.measure(trainer, pl_module, stage)
        values: dict[str, float] = {}
        distances: dict[str, dict[str, Tensor]] = {}
        for layer, layer_counts in counts.items():
            mass = layer_counts.mass.cpu()
            dead = dead_neurons(mass)
            values[f"{layer}/dead_share"] = float(dead.float().mean())
            values[f"{layer}/mean_length"] = _nanmean(neuron_length(mass)[~dead].float())
            overlap = filter_redundancy(mass)
            values[f"{layer}/redundancy"] = _nanmean(overlap[~torch.eye(len(mass), dtype=torch.bool)])
            distances[layer] = {}
            if stage != "validate":
                continue
            if layer in self._previous and self._previous[layer].shape == mass.shape:
                distances[layer]["previous"] = hellinger_distance(mass, self._previous[layer])
                values[f"{layer}/hellinger_previous"] = _nanmean(distances[layer]["previous"])
            if layer in self._reference and self._reference[layer].shape == mass.shape:
                distances[layer]["reference"] = hellinger_distance(mass, self._reference[layer])
                values[f"{layer}/hellinger_reference"] = _nanmean(distances[layer]["reference"])
                values[f"{layer}/length_shift"] = _nanmean(length_shift(mass, self._reference[layer]))
        if stage == "validate":
            self._previous = {layer: c.mass.cpu() for layer, c in counts.items()}
        self.log_values(pl_module, values, stage)
        if self.pictures_due(trainer, stage):
            self.log_pictures(trainer, self._log_pictures, stage, counts, distances)

    # ------------------------------------------------------------------------------------- pruning

    def scores(self, layer: str, score: str = "mass") -> Tensor:
        """TX-Ray's importance of each neuron of ``layer`` (higher: keep), from the latest validation counts.

        ``"mass"``: the neuron's share of the layer's maximal activation on the probe data (task relevance);
        ``"transfer"``: the Hellinger distance of its feature distribution to the reference's (how much training
        re-purposed it; a neuron dead now scores 0).
        """
        if layer not in self.layers:
            raise XAIConfigurationError(f"{self.where}: {layer!r} is not a monitored layer ({self.layers}).")
        counts = self.counts.get("validate", {}).get(layer)
        if counts is None:
            raise XAIConfigurationError(
                f"{self.where}: no counts for {layer!r} yet; scores exist after the first computed validation epoch "
                "(or call measure(trainer, pl_module) first)."
            )
        return neuron_scores(counts.mass.cpu(), self._reference.get(layer), score)

    def prune(self, layer: str, amount: float | int, score: str = "mass", fill: float = 0.0) -> Tensor:
        """Prunes the ``amount`` (fraction or count) lowest-scored neurons of ``layer`` inline (a forward hook
        setting their outputs to ``fill``; another call replaces it, ``amount=0`` removes it) and returns them."""
        neurons = lowest_scored(self.scores(layer, score), amount)
        previous = self._pruning_hooks.pop(layer, None)
        if previous is not None:
            previous.remove()
        if neurons.numel():
            self._pruning_hooks[layer] = prune_neurons(self._modules[layer], neurons, fill)
        return neurons

    def pruning_method(
        self, parameters_to_prune: Sequence[tuple[nn.Module, str]], score: str = "mass"
    ) -> type[prune.BasePruningMethod]:
        """A pruning method for Lightning's ``ModelPruning``: each epoch it removes whole output rows (neurons) of
        ``parameters_to_prune``, the ``amount`` lowest-scored per layer. Every parameter's module must be a
        monitored layer whose weight rows are its neurons (a Conv or Linear layer).

        Example::

            params = [(model.conv, "weight")]
            monitor = NeuronMonitor(layers=["conv"])
            pruning = ModelPruning(monitor.pruning_method(params, "mass"), parameters_to_prune=params, amount=0.2,
                                   use_lottery_ticket_hypothesis=False)
            Trainer(callbacks=[monitor, pruning])
        """
        if score not in NEURON_SCORES:
            raise XAIConfigurationError(f"{self.where}: unknown score {score!r}; available: {sorted(NEURON_SCORES)}.")

        def score_of(module: nn.Module) -> Tensor | None:
            layer = next((name for name, m in self._modules.items() if m is module), None)
            if layer is None:
                raise XAIConfigurationError(
                    f"{self.where}: ModelPruning prunes a {type(module).__name__} the monitor does not watch; add "
                    f"its name to layers= (monitored: {self.layers})."
                )
            if layer not in self.counts.get("validate", {}):
                return None
            return self.scores(layer, score)

        return neuron_pruning_method(score_of, parameters_to_prune, self.where)

    # ------------------------------------------------------------------------------------- pictures

    def _feature_name(self, feature: int) -> str:
        names = self.feature_names
        return names[feature] if names is not None and 0 <= feature < len(names) else str(feature)

    def _log_pictures(
        self, trainer: Trainer, stage: Stage, counts: dict[str, Any], distances: dict[str, dict[str, Tensor]]
    ) -> None:
        from lightning_xai import loggers, visualization

        step = trainer.global_step
        strongest: dict[str, list[tuple[int, float, str]]] = {}
        for layer, layer_counts in counts.items():
            mass = layer_counts.mass.cpu()
            share = mass.sum(-1) / mass.sum().clamp_min(1e-12)
            ids, shares = top_features(mass, self.top_k_features)
            lengths = neuron_length(mass)
            order = [int(i) for i in share.argsort(descending=True, stable=True)[: self.table_neurons] if share[i] > 0]
            reference = distances[layer].get("reference")
            rows = []
            for neuron in order:
                top = ", ".join(
                    f"{self._feature_name(int(f))} ({float(s):.2f})"
                    for f, s in zip(ids[neuron], shares[neuron])
                    if s > 0
                )
                distance = float(reference[neuron]) if reference is not None else math.nan
                rows.append([neuron, round(float(share[neuron]), 4), int(lengths[neuron]), round(distance, 3), top])
            columns = ["neuron", "mass share", "length", "hellinger to reference", "top features (share)"]
            loggers.log_table(trainer, self.key(f"{layer}/top_features", stage), columns, rows, step=step)
            strongest[layer] = [(row[0], row[1], ", ".join(row[4].split(", ")[:4])) for row in rows[:12]]
        loggers.log_image(
            trainer, self.key("top_features", stage), visualization.render_neuron_features(strongest), step=step
        )
        if any(distances.values()):
            image = visualization.render_neuron_histograms(distances)
            loggers.log_image(trainer, self.key("hellinger", stage), image, step=step)

    # ------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["reference"] = {layer: _sparse(mass) for layer, mass in self._reference.items()}
        state["previous"] = {layer: _sparse(mass) for layer, mass in self._previous.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._reference = {layer: _dense(stored) for layer, stored in state_dict.get("reference", {}).items()}
        self._previous = {layer: _dense(stored) for layer, stored in state_dict.get("previous", {}).items()}

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._probes.clear()
