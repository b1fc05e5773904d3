"""What the ClArC callbacks share: a concept activation vector at one layer, fitted from the masks of a loader.

:class:`ConceptVector` resolves the layer, checks a given vector's length against the layer's channels, fits the
vector and the mean concept strengths from batches whose mask marks the artifact, keeps them in the callback's
``state_dict`` and agrees on them across DDP ranks (rank 0's are broadcast).

The fit: for every sample with a non-empty mask among the first ``cav_batches`` batches of a seeded shuffle of the
loader's dataset (a loader of its own, the same on every rank: see :func:`fitting_loader`), the layer's activations
of the sample (with the artifact) and of its clean version (the masked features set to 0; for token ids the
masked positions replaced by ``clean_token_id``), pooled by the maximum over positions. The vector separates the
two sets (:func:`~lightning_xai.functional.concept_vectors.fit_cav`); ``mu_clean`` and ``mu_artifact`` are the
mean concept strengths of the clean and the artifact versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_xai._contract import LOGITS_KEY, batch_view, eval_mode, named_submodule, require_logits
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_warn
from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError
from lightning_xai.functional._layers import CHANNELS_FIRST_LAYERS, default_map_layer, forward_with_activation
from lightning_xai.functional.concept_vectors import CAV_METHODS, concept_strength, fit_cav, pooled_features
from lightning_xai.masks import masks_from_annotations

# modules that keep the channel count of what they receive (a Sequential ending in them has its last layer's count)
_KEEP_CHANNELS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

#: the output channels of a layer type, when its parameters say them
_CHANNEL_COUNTS: dict[type[nn.Module], Any] = {
    nn.modules.conv._ConvNd: lambda m: m.out_channels,
    nn.Linear: lambda m: m.out_features,
    nn.modules.batchnorm._NormBase: lambda m: m.num_features,
    nn.GroupNorm: lambda m: m.num_channels,
    nn.LayerNorm: lambda m: m.normalized_shape[-1],
    nn.Embedding: lambda m: m.embedding_dim,
    nn.RNNBase: lambda m: (getattr(m, "proj_size", 0) or m.hidden_size) * (2 if m.bidirectional else 1),
}


def _last_counted(module: nn.Module) -> nn.Module | None:
    """The module whose type tells ``module``'s output channels: itself, or a Sequential's last such child."""
    if isinstance(module, tuple(_CHANNEL_COUNTS)):
        return module
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            found = _last_counted(child)
            if found is not None:
                return found
            if not isinstance(child, _KEEP_CHANNELS):
                return None
    return None


def layer_channels(module: nn.Module) -> int | None:
    """The channel count of ``module``'s output when its type says it, else ``None`` (checked on first use)."""
    counted = _last_counted(module)
    if counted is None:
        return None
    for kind, count in _CHANNEL_COUNTS.items():
        if isinstance(counted, kind):
            return int(count(counted))
    return None


def layer_channel_dim(module: nn.Module) -> int | None:
    """1 for a layer with a channels-first 1-d output (``Conv1d`` and kin), else ``None`` (the default rule)."""
    counted = _last_counted(module)
    return 1 if isinstance(counted if counted is not None else module, CHANNELS_FIRST_LAYERS) else None


def first_loader(loaders: Any) -> Any:
    """The first loader of what ``trainer.*_dataloaders`` returns (a loader, a list or a dict of them)."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return next((loader for loader in loaders if loader is not None), None)
    return loaders


def _batch_size(loader: DataLoader) -> int:
    sampler: Any = loader.batch_sampler
    while sampler is not None:  # Lightning wraps the predict loader's batch sampler
        size = getattr(sampler, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
        sampler = getattr(sampler, "_batch_sampler", None)
    return 16


def fitting_loader(loader: Any, seed: int) -> Any:
    """A loader of its own over ``loader``'s dataset: a seeded shuffle, the same on every rank.

    Iterating the trainer's loader itself would disturb the loop that uses it: Lightning has created its iterator
    before the ``on_*_start`` hooks, a loader with ``persistent_workers`` hands that same iterator out again (and
    resets it), and the predict loop's batch sampler keeps the batch indices of one iterator only.
    """
    if not isinstance(loader, DataLoader):
        return loader
    common = dict(collate_fn=loader.collate_fn, num_workers=loader.num_workers, worker_init_fn=loader.worker_init_fn)
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, **common)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(loader.dataset, batch_size=_batch_size(loader), shuffle=True, generator=generator, **common)


def _forward(pl_module: nn.Module) -> Any:
    forward = getattr(pl_module, "xai_forward", None)
    if callable(forward):
        return forward
    key = getattr(pl_module, "xai_logits_key", LOGITS_KEY)
    return lambda inputs: require_logits(pl_module(inputs), type(pl_module).__name__, key)


def _device_of(pl_module: nn.Module) -> torch.device:
    parameter = next(iter(pl_module.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class ConceptVector:
    """A concept activation vector at one layer, with the mean concept strengths of clean and artifact samples.

    Args:
        owner: how errors name the callback.
        layer: the path of the layer (``None``: the last convolution, else the last recurrent layer).
        cav: a given vector (normalised to unit length) instead of fitting one.
        method: the fitter of :func:`~lightning_xai.functional.concept_vectors.fit_cav`.
        mask_key: the batch key of the artifact masks.
        cav_batches: how many batches of the loader the fit reads at most.
        clean_token_id: the token that replaces masked positions of token-id inputs in the clean versions.
        channel_dim: the channel dimension of the layer's output (``None``: inferred).
        seed: seed of the shuffle that picks the batches a fit reads.
    """

    def __init__(
        self,
        owner: str,
        layer: str | None,
        cav: Tensor | list[float] | None,
        method: str,
        mask_key: str,
        cav_batches: int,
        clean_token_id: int = 0,
        channel_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        if method not in CAV_METHODS:
            raise XAIConfigurationError(f"{owner}: cav_method must be one of {tuple(CAV_METHODS)}, got {method!r}.")
        if isinstance(cav_batches, bool) or not isinstance(cav_batches, int) or cav_batches < 1:
            raise XAIConfigurationError(f"{owner}: cav_batches must be an integer >= 1, got {cav_batches!r}.")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise XAIConfigurationError(f"{owner}: layer must be the path of a submodule (a string), got {layer!r}.")
        self.owner = owner
        self.layer = layer
        self.method = method
        self.mask_key = mask_key
        self.cav_batches = int(cav_batches)
        self.clean_token_id = int(clean_token_id)
        self.channel_dim = channel_dim
        self.seed = int(seed)
        self.cav: Tensor | None = None if cav is None else self._unit(cav)
        self.mu_clean: float | None = None
        self.mu_artifact: float | None = None
        #: where the vector came from: "given", "checkpoint" or the loader it was fitted on ("train", "test", ...)
        self.source: str | None = None if cav is None else "given"
        self._layer_path: str | None = layer
        self._module: nn.Module | None = None
        self._channels: int | None = None
        self._on_device: Tensor | None = None

    def _unit(self, cav: Tensor | list[float]) -> Tensor:
        vector = torch.as_tensor(cav, dtype=torch.float32).detach().cpu().clone()
        if vector.dim() != 1 or vector.numel() == 0:
            raise XAIConfigurationError(
                f"{self.owner}: cav must be a 1-d vector with one entry per channel of the layer, got shape "
                f"{tuple(vector.shape)}."
            )
        norm = vector.norm()
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            raise XAIConfigurationError(f"{self.owner}: cav must be finite and nonzero, got {vector.tolist()[:8]}.")
        return vector / norm

    # ----------------------------------------------------------------- the layer

    @property
    def layer_path(self) -> str:
        if self._layer_path is None:
            raise XAIConfigurationError(f"{self.owner}: the layer is resolved in setup(); the trainer has not run it.")
        return self._layer_path

    def setup(self, pl_module: nn.Module) -> nn.Module:
        """Resolves the layer on ``pl_module`` and checks a known vector's length against its channels."""
        path = self.layer if self.layer is not None else default_map_layer(pl_module, self.owner)
        module = named_submodule(pl_module, path, self.owner)
        self._layer_path, self._module = path, module
        self._channels = layer_channels(module)
        if self.channel_dim is None:
            self.channel_dim = layer_channel_dim(module)
        self.check_length()
        return module

    def module(self, pl_module: nn.Module) -> nn.Module:
        if self._module is None or self._layer_path is None:
            return self.setup(pl_module)
        return self._module

    def check_length(self, channels: int | None = None) -> None:
        channels = channels if channels is not None else self._channels
        if self.cav is not None and channels is not None and self.cav.shape[0] != channels:
            raise XAIConfigurationError(
                f"{self.owner}: the concept vector has {self.cav.shape[0]} entries, but layer {self._layer_path!r} "
                f"has {channels} channels. Give a cav of length {channels}, or name the layer it was fitted at."
            )

    # ----------------------------------------------------------------- the vector

    @property
    def fitted(self) -> bool:
        return self.cav is not None

    def has_means(self) -> bool:
        return self.mu_clean is not None and self.mu_artifact is not None

    def on_device(self, like: Tensor) -> Tensor:
        """The vector on ``like``'s device in float32 (cached)."""
        if self.cav is None:
            raise XAIConfigurationError(f"{self.owner}: the concept vector is not fitted yet.")
        cached = self._on_device
        if cached is None or cached.device != like.device:
            cached = self.cav.to(like.device)
            self._on_device = cached
        return cached

    def _set(self, cav: Tensor | None, mu_clean: float | None, mu_artifact: float | None, source: str) -> None:
        if cav is not None:
            self.cav = cav.detach().float().cpu().clone()
            self._on_device = None
        self.mu_clean = None if mu_clean is None else float(mu_clean)
        self.mu_artifact = None if mu_artifact is None else float(mu_artifact)
        self.source = source

    # ----------------------------------------------------------------- fitting

    def features(self, pl_module: nn.Module, loader: Any, trainer: Trainer | None = None) -> tuple[Tensor, Tensor]:
        """``(artifact, clean)`` pooled features ``(n, C)`` of the annotated samples of the first batches.

        A :class:`~torch.utils.data.DataLoader` is read through :func:`fitting_loader` (its dataset, a seeded
        shuffle); any other iterable of batches as it is.
        """
        layer = self.module(pl_module)
        forward = _forward(pl_module)
        device = _device_of(pl_module)
        artifact: list[Tensor] = []
        clean: list[Tensor] = []
        # random transforms of the dataset draw from the global generator: the fit must not change the training
        with eval_mode(pl_module), torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.no_grad():
            for index, batch in enumerate(fitting_loader(loader, self.seed)):
                if index >= self.cav_batches:
                    break
                pair = self._pair(pl_module, batch, device, trainer)
                if pair is None:
                    continue
                _, activation = forward_with_activation(forward, torch.cat(pair), layer, self.owner)
                pooled = pooled_features(activation, self.channel_dim).float().cpu()
                rows = pair[0].shape[0]
                artifact.append(pooled[:rows])
                clean.append(pooled[rows:])
        if not artifact:
            raise XAIConfigurationError(
                f"{self.owner}: no sample of the first {self.cav_batches} batches has a non-empty mask under "
                f"{self.mask_key!r}, so there is no artifact to fit the concept vector on. Mark the artifact in the "
                "masks, raise cav_batches, or give the vector (cav=...)."
            )
        return torch.cat(artifact), torch.cat(clean)

    def _pair(self, pl_module: nn.Module, batch: Any, device: torch.device, trainer: Trainer | None) -> Any:
        if trainer is not None:
            batch = trainer.strategy.batch_to_device(batch)
        else:
            batch = apply_to_collection(batch, Tensor, lambda t: t.to(device))
        data = batch_view(pl_module, batch)
        inputs = data.get("input")
        if not isinstance(inputs, Tensor):
            raise XAIConfigurationError(
                f"{self.owner}: batch['input'] must be a tensor, got {type(inputs).__name__}; override xai_batch()."
            )
        if self.mask_key not in data:
            raise MissingBatchKeyError(
                f"{self.owner} fits its concept vector from the artifact masks under the batch key "
                f"{self.mask_key!r}, but the batch has the keys {sorted(data)}. Add the masks, set mask_key=, or give "
                "the vector (cav=...)."
            )
        inputs = inputs.to(device)
        mask, annotated = masks_from_annotations(data[self.mask_key], inputs)
        rows = annotated.bool()
        if not bool(rows.any()):
            return None
        mask = mask.expand(inputs.shape)
        with_artifact, mask = inputs[rows], mask[rows]
        if inputs.is_floating_point():
            without = with_artifact * (1 - mask.to(with_artifact.dtype))
        else:
            without = torch.where(mask > 0, torch.full_like(with_artifact, self.clean_token_id), with_artifact)
        return with_artifact, without

    def fit(
        self,
        pl_module: nn.Module,
        loader: Any,
        trainer: Trainer | None = None,
        source: str = "loader",
        direction: bool = True,
    ) -> None:
        """Fits the vector (``direction``; else only the means along the given one) on ``loader``'s first batches.

        Under DDP every rank reads its own loader (the forwards stay collective, as sharded models need), and
        rank 0's vector and means are broadcast, so that every rank corrects along the same direction.
        """
        if loader is None:
            raise XAIConfigurationError(
                f"{self.owner} fits its concept vector from the {source} loader, and there is none. Give the "
                "trainer that loader, or the vector (cav=...)."
            )
        distributed = trainer is not None and trainer.world_size > 1
        outcome: dict[str, Any]
        error: BaseException | None = None
        try:
            artifact, clean = self.features(pl_module, loader, trainer)
            self.check_length(artifact.shape[1])
            if direction or self.cav is None:
                labels = torch.cat([torch.ones(artifact.shape[0]), torch.zeros(clean.shape[0])])
                cav = fit_cav(torch.cat([artifact, clean]), labels, self.method)  # type: ignore[arg-type]
            else:
                cav = self.cav
            outcome = {
                "cav": cav,
                "mu_clean": float(concept_strength(clean, cav).mean()),
                "mu_artifact": float(concept_strength(artifact, cav).mean()),
            }
        except Exception as raised:  # noqa: BLE001 - every rank must reach the broadcast
            if not distributed:
                raise
            error, outcome = raised, {"error": f"{type(raised).__name__}: {raised}"}
        if distributed:
            assert trainer is not None
            outcome = trainer.strategy.broadcast(outcome, src=0)
            if "error" in outcome:
                if error is not None:
                    raise error
                raise XAIConfigurationError(
                    f"{self.owner}: fitting the concept vector failed on rank 0: {outcome['error']}"
                )
            if error is not None:
                rank_zero_warn(f"{self.owner}: rank {trainer.global_rank} could not fit ({error}); it uses rank 0's.")
        self._set(outcome["cav"], outcome["mu_clean"], outcome["mu_artifact"], source)

    def ensure(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        loaders: Any,
        source: str,
        need_means: bool = False,
    ) -> None:
        """Fits on ``loaders``' first loader unless the vector (and, with ``need_means``, the means) is known."""
        if self.fitted and (self.has_means() or not need_means):
            return
        self.fit(pl_module, first_loader(loaders), trainer, source=source, direction=not self.fitted)

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._layer_path is not None:
            state["layer"] = self._layer_path
        if self.cav is not None:
            state["cav"] = self.cav.clone()
        for key in ("mu_clean", "mu_artifact"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value
        if self.source is not None:
            state["cav_source"] = self.source
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "cav" not in state:
            return
        saved_layer = state.get("layer")
        if saved_layer is not None and self._layer_path is not None and saved_layer != self._layer_path:
            raise XAIConfigurationError(
                f"{self.owner}: the checkpoint's concept vector belongs to layer {saved_layer!r}, but this callback "
                f"corrects layer {self._layer_path!r}. Set layer={saved_layer!r}, or start without the checkpoint."
            )
        cav = torch.as_tensor(state["cav"], dtype=torch.float32)
        self._set(cav, state.get("mu_clean"), state.get("mu_artifact"), str(state.get("cav_source", "checkpoint")))
        self.check_length()


class ConceptVectorArguments:
    """The fitted vector and the fit's arguments of a callback that owns a :class:`ConceptVector` (``concept``)."""

    concept: ConceptVector

    @property
    def cav(self) -> Tensor | None:
        """The unit concept vector (CPU), once given or fitted."""
        return self.concept.cav

    @property
    def mask_key(self) -> str:
        """The batch key of the artifact masks the vector is fitted from."""
        return self.concept.mask_key

    @property
    def cav_batches(self) -> int:
        return self.concept.cav_batches

    @property
    def cav_method(self) -> str:
        return self.concept.method

    @property
    def layer(self) -> str | None:
        """The path of the corrected layer (resolved in ``setup`` when not given)."""
        return self.concept._layer_path

    @property
    def mu_clean(self) -> float | None:
        """The mean concept strength ``v . maxpool(a)`` of the clean versions, once fitted."""
        return self.concept.mu_clean

    @property
    def mu_artifact(self) -> float | None:
        """The mean concept strength of the samples with the artifact, once fitted."""
        return self.concept.mu_artifact
