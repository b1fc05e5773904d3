"""EmotionTemplates: counterfactual twins, the planted label bias, and a classifier that learns it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai.datasets import EmotionTemplates
from lightning_xai.datasets.emotion_templates import MOODS, PERSON_PAIRS
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import ate_ground_truth, conexp


def test_counterfactuals_swap_only_the_person_and_keep_the_length():
    data = EmotionTemplates(size=300, seed=0)
    female = {p[0].lower() for p in PERSON_PAIRS}
    male = {p[1].lower() for p in PERSON_PAIRS}
    for sentence in data.sentences:
        original, twin = sentence.text.split(), sentence.counterfactual.split()
        changed = [(a, b) for a, b in zip(original, twin) if a != b]
        assert len(original) == len(twin) and 1 <= len(changed) <= 1 + 1  # "my sister" -> "my brother": one word
        for a, b in changed:
            assert (a in " ".join(female) and b in " ".join(male)) or (a in " ".join(male) and b in " ".join(female))
    assert (data.inputs != data.counterfactual_inputs).any(1).all()
    assert torch.equal(EmotionTemplates(size=50, seed=3).inputs, EmotionTemplates(size=50, seed=3).inputs)


def test_labels_follow_the_planted_bias_and_moods_the_confounding():
    data = EmotionTemplates(size=6000, bias=0.4, confounding=0.3, seed=1)
    changed = (data.targets != data.moods).float()
    joy, anger = MOODS.index("joy"), MOODS.index("anger")
    # a biased female label is "joy": it differs from the mood unless the mood was joy already
    female = data.genders == 0
    assert changed[female].mean().item() == pytest.approx(
        0.4 * (1 - (data.moods[female] == joy).float().mean().item()), abs=0.03
    )
    assert (data.targets[female & (data.targets != data.moods)] == joy).all()
    assert (data.targets[~female & (data.targets != data.moods)] == anger).all()
    joy_rate = {g: (data.moods[data.genders == g] == joy).float().mean().item() for g in (0, 1)}
    assert joy_rate[0] == pytest.approx(0.3 + 0.7 / 5, abs=0.03) and joy_rate[1] == pytest.approx(0.7 / 5, abs=0.03)
    with pytest.raises(XAIConfigurationError, match="bias and confounding"):
        EmotionTemplates(size=1, bias=1.5)


def _bag_of_words_classifier(data: EmotionTemplates, epochs: int = 60) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(len(data.vocabulary), 16, mode="mean", padding_idx=0), nn.Linear(16, 5))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(model(data.inputs), data.targets).backward()
        optimizer.step()
    return model.eval()


def test_a_classifier_learns_the_planted_effect_and_conexp_overstates_it():
    effects = {}
    for bias in (0.0, 0.4):
        data = EmotionTemplates(size=3000, bias=bias, confounding=0.3, seed=2)
        model = _bag_of_words_classifier(data)
        with torch.no_grad():
            p, p_cf = model(data.inputs).softmax(1), model(data.counterfactual_inputs).softmax(1)
        effects[bias] = (ate_ground_truth(p, p_cf).value, conexp(p, data.genders).value)
    assert effects[0.0][0] < 0.05  # no label bias: swapping gender barely moves the prediction
    assert effects[0.4][0] > 0.25  # measured: the classifier learned the planted gender effect
    assert effects[0.0][1] > effects[0.0][0] + 0.1  # confounding alone: CONEXP sees an effect that is not there
