"""AdultIncome reads a UCI Adult CSV (a small synthetic one here) into inputs, labels and protected codes."""

from __future__ import annotations

import pytest
import torch

from lightning_xai.datasets import AdultIncome
from lightning_xai.datasets.adult import RACE_VALUES, SEX_VALUES
from lightning_xai.errors import XAIConfigurationError

HEADER = (
    "age,workclass,fnlwgt,education,education-num,marital-status,occupation,relationship,race,sex,"
    "capital-gain,capital-loss,hours-per-week,native-country,income-per-year"
)
ROWS = [
    "39, State-gov,77516,Bachelors,13,Never-married,Sales,Not-in-family,White,Male,2174,0,40,United-States,<=50K",
    "50,Self-emp-not-inc,83311,Bachelors,13,Married-civ-spouse,Exec-managerial,Husband,Black,Female,0,0,13,?,>50K",
    "38,Private,215646,HS-grad,9,Divorced,Handlers-cleaners,Not-in-family,Other,Male,0,0,40,United-States,<=50K.",
    "53,Private,234721,11th,7,Married-civ-spouse,Handlers-cleaners,Husband,Amer-Indian-Eskimo,Female,0,0,40,Cuba,>50K.",
]


def write(tmp_path, rows, header=HEADER):
    path = tmp_path / "adult.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_reads_labels_codes_and_one_hot_columns(tmp_path):
    data = AdultIncome(write(tmp_path, ROWS))
    assert len(data) == 4
    assert data.targets.tolist() == [0, 1, 0, 1]  # ">50K" and ">50K." (the test file's spelling)
    assert data.sex.tolist() == [SEX_VALUES.index(s) for s in ("Male", "Female", "Male", "Female")]
    assert data.race.tolist() == [RACE_VALUES.index(r) for r in ("White", "Black", "Other", "Amer-Indian-Eskimo")]
    assert data.cells.tolist() == (data.sex * 5 + data.race).tolist()
    sex_columns = data.attribute_columns["sex"]
    assert [data.feature_names[c] for c in sex_columns] == ["sex=Male", "sex=Female"]
    torch.testing.assert_close(data.inputs[:, sex_columns], torch.nn.functional.one_hot(data.sex, 2).float())
    assert len(data.attribute_columns["race"]) == 5
    numeric = data.inputs[:, :6]
    torch.testing.assert_close(numeric.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    item = data[1]
    assert set(item) == {"input", "target", "sex", "race"} and item["target"].item() == 1


def test_a_test_file_is_encoded_like_the_training_file(tmp_path):
    train = AdultIncome(write(tmp_path, ROWS))
    test_path = tmp_path / "test.csv"
    test_path.write_text(HEADER + "\n" + ROWS[0].replace("State-gov", "Never-worked") + "\n")
    test = AdultIncome(test_path, standardize_with=train)
    assert test.feature_names == train.feature_names
    torch.testing.assert_close(
        test.inputs[0, 6:], train.inputs[0, 6:] * (train.inputs[0, 6:] != 0) * 0 + test.inputs[0, 6:]
    )
    workclass = [i for i, name in enumerate(train.feature_names) if name.startswith("workclass=")]
    assert test.inputs[0, workclass].sum() == 0  # an unseen category stays all-zero
    torch.testing.assert_close(test.inputs[0, :6], train.inputs[0, :6])


def test_missing_file_columns_and_unknown_values_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        AdultIncome(tmp_path / "nope.csv")
    with pytest.raises(XAIConfigurationError, match=r"lacks the columns \['age'\]"):
        AdultIncome(write(tmp_path, [r.split(",", 1)[1] for r in ROWS], header=HEADER.split(",", 1)[1]))
    with pytest.raises(XAIConfigurationError, match="sex='Unknown'"):
        AdultIncome(write(tmp_path, [ROWS[0].replace("Male", "Unknown")]))


def test_race_grouping_white_other_gives_four_cells_and_counterfactuals_set_the_right_columns(tmp_path):
    data = AdultIncome(write(tmp_path, ROWS), race_grouping="white_other")
    assert data.race_names == ("White", "other") and data.race.tolist() == [0, 1, 1, 1]
    assert data.cells.tolist() == (data.sex * 2 + data.race).tolist()
    race, sex = data.attribute_columns["race"], data.attribute_columns["sex"]
    as_other = data.counterfactual(data.inputs, "race", 1)  # "other" is set as Black, the group's largest race
    assert as_other[:, race].tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]] * 4
    as_female = data.counterfactual(data.inputs, "sex", 1)
    assert as_female[:, sex].tolist() == [[0.0, 1.0]] * 4
    keep = [c for c in range(data.inputs.shape[1]) if c not in sex]
    torch.testing.assert_close(as_female[:, keep], data.inputs[:, keep])  # nothing else changes
    with pytest.raises(XAIConfigurationError, match="race_grouping must be one of"):
        AdultIncome(write(tmp_path, ROWS), race_grouping="binary")


def synthetic_adult(tmp_path, n: int = 600, seed: int = 0):
    """A random Adult-shaped CSV in which income depends on education and on sex."""
    import random

    rng = random.Random(seed)
    lines = [HEADER]
    for _ in range(n):
        sex, race = rng.choice(SEX_VALUES), rng.choice(["White"] * 6 + list(RACE_VALUES[1:]))
        years = rng.randint(6, 16)
        rich = years + (3 if sex == "Male" else 0) + rng.gauss(0, 2) > 15
        lines.append(
            f"{rng.randint(18, 70)},Private,{rng.randint(20000, 300000)},HS-grad,{years},"
            f"{rng.choice(['Never-married', 'Married-civ-spouse'])},Sales,Husband,{race},{sex},"
            f"{rng.choice([0, 0, 5000])},0,{rng.randint(20, 60)},United-States,{'>50K' if rich else '<=50K'}"
        )
    path = tmp_path / "synthetic_adult.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
