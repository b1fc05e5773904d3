"""The UCI Adult (Census Income) table, read from a CSV the user passes, with protected attributes as codes."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_xai.errors import XAIConfigurationError

NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
CATEGORICAL = (
    "workclass",
    "education",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "native-country",
)
LABEL = "income-per-year"
SEX_VALUES = ("Male", "Female")
RACE_VALUES = ("White", "Black", "Amer-Indian-Eskimo", "Asian-Pac-Islander", "Other")
#: how the race codes group the five races: each grouping's value names, and the group of each race
RACE_GROUPINGS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "all": (RACE_VALUES, (0, 1, 2, 3, 4)),
    "white_other": (("White", "other"), (0, 1, 1, 1, 1)),  # the 4-cell intersectional protocol
}
_LOG_SCALED = ("capital-gain", "capital-loss", "fnlwgt")


class AdultIncome(Dataset[dict[str, Tensor]]):
    """UCI Adult: predict ``income > 50K`` from 14 census columns, with ``sex`` and ``race`` as protected codes.

    Reads the CSV with a header row (``age, workclass, fnlwgt, ..., native-country, income-per-year``, as in
    the common ``adult.csv`` exports; ``income`` or ``class`` also name the label). Numeric columns are
    standardized (``capital-gain``, ``capital-loss`` and ``fnlwgt`` after ``log1p``), categorical columns are
    one-hot encoded (``?`` is a category of its own), and the protected attributes are kept both as one-hot
    input columns and as integer codes: ``sex`` in :data:`SEX_VALUES` order, ``race`` in :data:`RACE_VALUES`
    order (2 x 5 = 10 intersectional cells), or grouped by ``race_grouping`` (``"white_other"``: White /
    other, 2 x 2 = 4 cells, whose smallest cell is not a few dozen rows). The input columns keep all five
    races. No data ships with the package.

    Items are dicts ``{"input", "target", "sex", "race"}`` (the batch contract's dict layout).

    Args:
        path: the CSV file.
        standardize_with: another ``AdultIncome`` (the training split) whose means, deviations and
            categories to use, so that a test file is encoded like the training data.
        race_grouping: ``"all"`` (5 race codes) or ``"white_other"`` (2) for the ``race`` codes.

    Attributes:
        inputs: ``(N, F)`` float features. targets: ``(N,)`` 0/1. sex, race: ``(N,)`` codes.
        feature_names: the name of each input column (``sex=Female``, ``age``, ...).
        attribute_columns: the one-hot input columns of ``sex`` and ``race`` (for the flip test with the
            five race codes; under a grouping use :meth:`counterfactual`).
        race_names: the names of the ``race`` codes (:data:`RACE_VALUES`, or ``("White", "other")``).
    """

    def __init__(
        self, path: str | Path, standardize_with: AdultIncome | None = None, race_grouping: str = "all"
    ) -> None:
        if race_grouping not in RACE_GROUPINGS:
            raise XAIConfigurationError(
                f"AdultIncome: race_grouping must be one of {sorted(RACE_GROUPINGS)}, got {race_grouping!r}."
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"AdultIncome: no file at {path}; pass the path of the UCI Adult CSV (adult.csv, with a header row)."
            )
        with path.open(newline="") as handle:
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(handle)]
        if not rows:
            raise XAIConfigurationError(f"AdultIncome: {path} holds no rows.")
        label = next((name for name in (LABEL, "income", "class") if name in rows[0]), None)
        missing = [c for c in (*NUMERIC, *CATEGORICAL) if c not in rows[0]]
        if label is None or missing:
            raise XAIConfigurationError(
                f"AdultIncome: {path} lacks the columns {missing + ([LABEL] if label is None else [])}; it has "
                f"{sorted(rows[0])}. Use the UCI Adult CSV with its header row."
            )
        for row in rows:
            for column, known in (("sex", SEX_VALUES), ("race", RACE_VALUES)):
                if row[column] not in known:
                    raise XAIConfigurationError(
                        f"AdultIncome: {path} has {column}={row[column]!r}; expected one of {list(known)}."
                    )
        if standardize_with is None:
            self.categories = {c: sorted({row[c] for row in rows}) for c in CATEGORICAL}
            self.categories["sex"], self.categories["race"] = list(SEX_VALUES), list(RACE_VALUES)
            numeric = self._numeric(rows)
            self.means, self.stds = numeric.mean(0), numeric.std(0).clamp_min(1e-6)
        else:
            self.categories, self.means, self.stds = (
                standardize_with.categories,
                standardize_with.means,
                standardize_with.stds,
            )
        numeric = (self._numeric(rows) - self.means) / self.stds
        blocks, self.feature_names, self.attribute_columns = [numeric], list(NUMERIC), {}
        for column in CATEGORICAL:
            values = self.categories[column]
            index = {v: i for i, v in enumerate(values)}
            codes = torch.tensor([index.get(row[column], -1) for row in rows])
            one_hot = torch.zeros(len(rows), len(values))
            known = codes >= 0  # a category unseen in the training split stays all-zero
            one_hot[known.nonzero().squeeze(1), codes[known]] = 1.0
            if column in ("sex", "race"):
                self.attribute_columns[column] = list(
                    range(len(self.feature_names), len(self.feature_names) + len(values))
                )
            blocks.append(one_hot)
            self.feature_names += [f"{column}={v}" for v in values]
        self.inputs = torch.cat(blocks, dim=1)
        self.targets = torch.tensor([1 if row[label].rstrip(".").startswith(">") else 0 for row in rows])
        self.sex = torch.tensor([SEX_VALUES.index(row["sex"]) for row in rows])
        self.race_names, group_of = RACE_GROUPINGS[race_grouping]
        # the race whose input column stands for each race code in a counterfactual: the group's largest race
        self._race_column_of_code = [group_of.index(code) if code == 0 else 1 for code in range(len(self.race_names))]
        self.race = torch.tensor([group_of[RACE_VALUES.index(row["race"])] for row in rows])

    @staticmethod
    def _numeric(rows: Sequence[dict[str, str]]) -> Tensor:
        values = []
        for row in rows:
            entry = []
            for column in NUMERIC:
                value = float(row[column]) if row[column] not in ("", "?") else 0.0
                entry.append(math.log1p(max(value, 0.0)) if column in _LOG_SCALED else value)
            values.append(entry)
        return torch.tensor(values, dtype=torch.float32)

    def counterfactual(self, inputs: Tensor, attribute: str, value: int) -> Tensor:
        """``inputs`` with the protected ``attribute`` set to code ``value`` in every row (a flip-test input).

        The attribute's one-hot input columns are cleared and the column of ``value`` is set. Under the
        ``"white_other"`` grouping the code ``other`` sets the column of Black, the largest race of the group.
        Pass it as ``FairnessMetrics(counterfactual_fn=dataset.counterfactual)``.
        """
        columns = self.attribute_columns[attribute]
        column = columns[value if attribute == "sex" else self._race_column_of_code[value]]
        flipped = inputs.clone()
        flipped[:, columns] = 0.0
        flipped[:, column] = 1.0
        return flipped

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input": self.inputs[index],
            "target": self.targets[index],
            "sex": self.sex[index],
            "race": self.race[index],
        }

    @property
    def cells(self) -> Tensor:
        """The intersectional cell of every row, ``sex * len(race_names) + race``."""
        return self.sex * len(self.race_names) + self.race
