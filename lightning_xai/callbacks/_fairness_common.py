"""Shared by the fairness callbacks: the protected attributes of a batch and the names of their cells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_xai.errors import GroupValueError, MissingBatchKeyError, XAIConfigurationError


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
    """One log-safe name per intersectional cell, in mixed-radix order: ``Male_White``, or ``sex1_race4``.

    Names become key components (``fair/cell/<cell>/count``) and chart labels, so every character other than a
    letter, a digit, ``-`` and ``.`` becomes ``-`` (a batch key such as ``../x`` or ``$\frac$`` cannot escape
    the key or reach mathtext); two values whose names would coincide are refused.
    """
    per_attribute = []
    for attribute, k in zip(attributes, num_values):
        names = list(value_names[attribute]) if value_names and attribute in value_names else None
        if names is not None and len(names) != k:
            raise XAIConfigurationError(
                f"value_names[{attribute!r}] has {len(names)} names for {k} values; give one name per value."
            )
        safe = [_safe(n) for n in names] if names else [f"{_safe(attribute)}{v}" for v in range(k)]
        if len(set(safe)) != k:
            raise XAIConfigurationError(
                f"the values of {attribute!r} get the cell names {safe} in the logs (characters other than letters, "
                "digits, '-' and '.' become '-'), which repeat; give value_names that differ in letters or digits."
            )
        per_attribute.append(safe)
    cells = [""]
    for names in per_attribute:
        cells = [f"{prefix}_{name}" if prefix else name for prefix in cells for name in names]
    return cells


def attribute_keys(attributes: Sequence[str]) -> list[str]:
    """The attributes' names as log-key components (``fair/flip/<attribute>/...``); distinct, or an error."""
    keys = [_safe(attribute) for attribute in attributes]
    if len(set(keys)) != len(keys):
        raise XAIConfigurationError(
            f"the attributes {list(attributes)} get the key names {keys} in the logs (characters other than letters, "
            "digits, '-' and '.' become '-'), which repeat; rename the batch keys."
        )
    return keys


def _safe(name: str) -> str:
    # MLflow and TensorBoard accept [A-Za-z0-9_.-/ ] in keys; the cell name is one path component, never "." or ".."
    safe = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(name).strip())
    return "empty" if not safe.strip(".") else safe


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
