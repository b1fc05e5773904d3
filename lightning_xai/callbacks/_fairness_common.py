"""Shared by the fairness callbacks: protected attributes from the batch and model outputs from a hook."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import GroupValueError, MissingBatchKeyError, XAIConfigurationError
from lightning_xai.mixin import XAIMixin


def check_attributes(attributes: Sequence[str], num_values: Sequence[int], where: str) -> None:
    if isinstance(attributes, str) or not attributes:
        raise XAIConfigurationError(f"{where}: attributes must be a non-empty list of batch keys, got {attributes!r}.")
    if len(num_values) != len(attributes):
        raise XAIConfigurationError(
            f"{where}: num_values has {len(num_values)} entries for {len(attributes)} attributes {list(attributes)}; "
            "give the number of values of each attribute, in the same order."
        )
    if any(int(k) < 1 for k in num_values):
        raise XAIConfigurationError(f"{where}: every entry of num_values must be >= 1, got {list(num_values)}.")


def cell_names(
    attributes: Sequence[str], num_values: Sequence[int], value_names: Mapping[str, Sequence[str]] | None
) -> list[str]:
    """One log-safe name per intersectional cell, in mixed-radix order: ``Male_White``, or ``sex1_race4``."""
    per_attribute = []
    for attribute, k in zip(attributes, num_values):
        names = list(value_names[attribute]) if value_names and attribute in value_names else None
        if names is not None and len(names) != k:
            raise XAIConfigurationError(
                f"value_names[{attribute!r}] has {len(names)} names for {k} values; give one name per value."
            )
        per_attribute.append([_safe(n) for n in names] if names else [f"{attribute}{v}" for v in range(k)])
    cells = [""]
    for names in per_attribute:
        cells = [f"{prefix}_{name}" if prefix else name for prefix in cells for name in names]
    return cells


def _safe(name: str) -> str:
    # MLflow and TensorBoard accept [A-Za-z0-9_.-/ ] in keys; the cell name is one path component
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(name).strip()) or "empty"


def read_groups(data: Mapping[str, Any], attributes: Sequence[str], groups_key: str, where: str) -> Tensor:
    """``(N, A)`` attribute codes: from one batch key per attribute, or from ``batch[groups_key]`` columns."""
    if all(attribute in data for attribute in attributes):
        columns = [torch.as_tensor(data[attribute]).reshape(-1) for attribute in attributes]
        if len({c.shape[0] for c in columns}) != 1:
            raise GroupValueError(
                f"{where}: the attributes {list(attributes)} have different lengths "
                f"{[c.shape[0] for c in columns]} in this batch; give one value per example."
            )
        return torch.stack([c.to(columns[0].device) for c in columns], dim=1)
    if groups_key in data:
        groups = torch.as_tensor(data[groups_key])
        if groups.dim() == 1:
            groups = groups.unsqueeze(1)
        if groups.dim() != 2 or groups.shape[1] != len(attributes):
            raise GroupValueError(
                f"{where}: batch[{groups_key!r}] has shape {tuple(groups.shape)}, but {len(attributes)} attributes "
                f"{list(attributes)} need shape (N, {len(attributes)}), one column per attribute in that order."
            )
        return groups
    missing = [attribute for attribute in attributes if attribute not in data]
    raise MissingBatchKeyError(
        f"{where} needs the protected attributes {missing} (one batch key each) or a {groups_key!r} entry of shape "
        f"(N, {len(attributes)}), but the batch has the keys {sorted(data)}. Add them to your batches (a dict, or "
        "a third tuple element {'sex': ..., 'race': ...}) or override xai_batch() on your LightningModule."
    )


def batch_view(pl_module: nn.Module, batch: Any, where: str) -> Mapping[str, Any]:
    """The batch contract's mapping: ``xai_batch`` for an XAIMixin; dicts and ``(x, y[, extras])`` otherwise."""
    if isinstance(pl_module, XAIMixin):
        return pl_module.xai_batch(batch)
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        extras = batch[2] if len(batch) > 2 and isinstance(batch[2], Mapping) else {}
        return {"input": batch[0], "target": batch[1], **extras}
    raise XAIConfigurationError(
        f"{where} cannot read a {type(batch).__name__} batch; subclass XAIMixin and override xai_batch()."
    )


def logits_of(output: Any) -> Tensor | None:
    """The logits in a module output: a tensor, a Hugging Face ``ModelOutput`` (``.logits``), a tuple's first."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def named_submodule(pl_module: nn.Module, name: str, where: str) -> nn.Module:
    """``pl_module.get_submodule(name)``, or an error that lists the submodules there are."""
    try:
        return pl_module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in pl_module.named_modules() if n]
        raise XAIConfigurationError(
            f"{where}: {type(pl_module).__name__} has no submodule {name!r}; its submodules include "
            f"{names[:25]}{' ...' if len(names) > 25 else ''}."
        ) from None


def output_module(pl_module: nn.Module, output_layer: str | None, where: str) -> nn.Module:
    """The module whose output are the logits: ``output_layer``, or the LightningModule itself."""
    return pl_module if output_layer is None else named_submodule(pl_module, output_layer, where)


def forward_logits(model: nn.Module, inputs: Tensor, where: str) -> Tensor:
    """Logits of ``model`` on ``inputs`` without gradients: ``xai_forward`` for an XAIMixin, else ``model(inputs)``."""
    with torch.no_grad():
        output = model.xai_forward(inputs) if isinstance(model, XAIMixin) else model(inputs)
    logits = logits_of(output)
    if logits is None:
        raise XAIConfigurationError(
            f"{where}: {type(model).__name__} returned {type(output).__name__}, not logits; override xai_forward()."
        )
    return logits


def capture_outputs(module: nn.Module, batch_size: Callable[[], int | None], store: dict[str, Any], key: str):
    """Hooks ``module``; keeps its first output whose leading dimension is the batch size. Returns the remover."""

    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        if key in store:
            return
        logits = logits_of(output)
        if logits is not None and logits.dim() >= 1 and logits.shape[0] == batch_size():
            store[key] = logits

    return module.register_forward_hook(hook).remove
