"""Any set of loss terms on one model: every pair on a CNN and on an LSTM text model, with the user's own hooks.

One SGD step is linear in the gradients, so a pair of terms must move the parameters by exactly the sum of what
each term moves them by alone (minus the task loss counted twice). A term that breaks another (CDEP's shared
forward hiding a concept head's layer, a hook that sees fx Proxies, a capture that misses the output) shows up as
an error or as a different update.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import (
    AdversarialConceptHead,
    ControlConceptHead,
    ExplanationPenalty,
    FairnessConstraint,
    MutualInformationRegularizer,
)
from lightning_xai.callbacks._concept_head import ConceptHead
from lightning_xai.masks import collate_annotations
from tests.helpers import DictDataset, LSTMTextClassifierBody, bind, loader, trainer

LR = 0.5

# ----------------------------------------------------------------------------------------------- models


class CompositionCNNBody(XAIMixin):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class CompositionTextBody(LSTMTextClassifierBody):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(vocab=40, embed=16, hidden=16, classes=2)

    def configure_optimizers(self):  # SGD: one step is linear in the gradients
        return torch.optim.SGD(self.parameters(), lr=LR)


def cnn_batch(n: int = 8, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(
        input=torch.rand(n, 1, 8, 8, generator=g),
        target=torch.randint(0, 3, (n,), generator=g),
        mask=(torch.rand(n, 1, 8, 8, generator=g) > 0.7).float(),
        sex=torch.arange(n) % 2,
        gender=torch.randint(0, 2, (n,), generator=g),
        control=torch.randint(0, 2, (n,), generator=g),
    )


def text_batch(n: int = 8, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(4, 40, (n, 8), generator=g)
    ids[:, 2] = labels + 1  # a decoy token; its span is the mask
    return DictDataset(
        input_ids=ids,
        labels=labels,
        mask=[[(2, 3)] if i % 4 else None for i in range(n)],  # per-sample spans, some samples unannotated
        sex=torch.arange(n) % 2,
        gender=torch.randint(0, 2, (n,), generator=g),
        control=torch.randint(0, 2, (n,), generator=g),
    )


def _terms(layer: str, selector=None) -> dict[str, object]:
    return {
        "cdep": lambda: ExplanationPenalty("cdep", weight=2.0),
        "rrr": lambda: ExplanationPenalty("rrr", weight=2.0),
        "input_x_gradient": lambda: ExplanationPenalty("input_x_gradient", weight=2.0),
        "expected_gradients": lambda: ExplanationPenalty("expected_gradients", weight=2.0),
        "ablation": lambda: ExplanationPenalty("ablation", weight=2.0),
        "mutual_information": lambda: MutualInformationRegularizer(["sex"], [2], weight=2.0),
        "mutual_information_head": lambda: MutualInformationRegularizer(
            ["sex"], [2], weight=2.0, output_layer="head", name="mi_head"
        ),
        "adversary": lambda: AdversarialConceptHead(
            layer, "gender", 2, reversal=0.5, schedule="constant", selector=selector
        ),
        "control": lambda: ControlConceptHead(layer, "control", 2, selector=selector),
    }


#: the XIL typology's methods, paired with one term of each kind below (every pair of all terms would double the run)
EXTRA_TERMS = {
    "cnn": {
        "rrr_gradcam": lambda: ExplanationPenalty("rrr_gradcam", weight=2.0),
        "hint": lambda: ExplanationPenalty("hint", weight=2.0),
        "rbr": lambda: ExplanationPenalty("rbr", weight=2.0),
        "counterexamples": lambda: ExplanationPenalty("counterexamples", weight=2.0),
        "fairness_constraint": lambda: FairnessConstraint(["sex"], [2], max_dp_difference=0.0, initial_multiplier=2.0),
    },
    "text": {
        "rrr_gradcam": lambda: ExplanationPenalty("rrr_gradcam", weight=2.0),
        "counterexamples": lambda: ExplanationPenalty("counterexamples", weight=2.0),
        "fairness_constraint": lambda: FairnessConstraint(["sex"], [2], max_dp_difference=0.0, initial_multiplier=2.0),
    },
}
EXTRA_PARTNERS = ("cdep", "rrr", "mutual_information", "adversary")
CNN_TERMS = {**_terms("features"), **EXTRA_TERMS["cnn"]}
TEXT_TERMS = {**_terms("lstm", selector=0), **EXTRA_TERMS["text"]}
CASES = {
    "cnn": (CompositionCNNBody, cnn_batch, CNN_TERMS, "features.0", None),
    "text": (CompositionTextBody, text_batch, TEXT_TERMS, "embedding", collate_annotations),
}

# ----------------------------------------------------------------------------------------------- runs


def seed_heads(model, callbacks):
    """Creates the concept heads now, each from its own seed: the same start in every run."""
    for callback in callbacks:
        if isinstance(callback, ConceptHead):
            torch.manual_seed(len(callback.term_name))
            callback.setup(None, model, "fit")
    return callbacks


@functools.cache
def _run(case: str, terms: tuple[str, ...], package=pl, user_hook: bool = True):
    body, make_data, table, hooked, collate = CASES[case]
    model = bind(body, package)()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []  # the user's own hook: it must fire on real tensors, once per forward of the step at least
    if user_hook:
        handle = model.get_submodule(hooked).register_forward_hook(lambda m, a, out: seen.append(type(out)))
    callbacks = [table[term]() for term in terms]
    seed_heads(model, callbacks)
    run = trainer(package, max_steps=1, callbacks=callbacks)
    run.fit(model, loader(make_data(), 8, collate_fn=collate))
    if user_hook:
        handle.remove()
        assert seen and all(t is torch.Tensor for t in seen), seen
    moved = {name: model.get_parameter(name).detach() - before for name, before in initial.items()}
    values = {key: value.item() for key, value in run.callback_metrics.items() if key.endswith("_step")}
    return moved, values, callbacks


PAIRS = [
    (case, pair)
    for case in CASES
    for pair in itertools.combinations([term for term in CASES[case][2] if term not in EXTRA_TERMS[case]], 2)
] + [
    (case, (extra, partner))
    for case in CASES
    for extra in EXTRA_TERMS[case]
    for partner in (*EXTRA_PARTNERS, *[other for other in EXTRA_TERMS[case] if other > extra])
]


@pytest.mark.parametrize(("case", "pair"), PAIRS, ids=[f"{case}-{a}+{b}" for case, (a, b) in PAIRS])
def test_a_pair_of_loss_terms_adds_exactly_both_terms_updates(case, pair, lightning_package):
    moved, values, callbacks = _run(case, pair, lightning_package)
    alone = [_run(case, (term,), lightning_package) for term in pair]
    vanilla, _, _ = _run(case, (), lightning_package)
    for callback in callbacks:
        assert callback.steps_seen == 1
        value = values[f"xai/{callback.term_name}_step"]
        alone_value = alone[callbacks.index(callback)][1][f"xai/{callback.term_name}_step"]
        # abs: an exact RRR / Input x Gradient partner reuses the step's forward and runs it on the native LSTM,
        # whose rounding differs from oneDNN's (the text MI value, 1.8e-4, moves by 3e-8)
        assert value == pytest.approx(alone_value, rel=1e-5, abs=1e-7)
    assert values["xai/total_step"] == pytest.approx(
        sum(callback.weight * values[f"xai/{callback.term_name}_step"] for callback in callbacks), rel=1e-5
    )
    for name, step in vanilla.items():  # the model's own parameters; heads exist only in their runs
        expected = alone[0][0][name] + alone[1][0][name] - step
        torch.testing.assert_close(moved[name], expected, atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("partner", "shares"),
    [("mutual_information", True), ("rrr", True), ("mutual_information_head", False), ("adversary", False)],
)
def test_cdep_shares_the_step_forward_unless_a_submodule_is_hooked(partner, shares):
    # hooks on the module itself see the shared forward's output; hooks on submodules need the real forward
    moved, values, callbacks = _run("cnn", ("cdep", partner), user_hook=False)
    alone = [_run("cnn", (term,), user_hook=False) for term in ("cdep", partner)]
    vanilla, _, _ = _run("cnn", (), user_hook=False)
    assert callbacks[0].steps_sharing_forward == int(shares)
    for name, step in vanilla.items():
        torch.testing.assert_close(moved[name], alone[0][0][name] + alone[1][0][name] - step, atol=2e-6, rtol=1e-4)


class NormedCNNBody(CompositionCNNBody):
    def __init__(self, norm: str):
        super().__init__()
        self.norm = norm
        wrap = {
            "old weight_norm": nn.utils.weight_norm,  # recomputes the weight in a forward pre-hook
            "weight_norm": nn.utils.parametrizations.weight_norm,  # recomputes it on every access
            "old spectral_norm": nn.utils.spectral_norm,
        }[norm]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # old-style weight_norm is deprecated
            self.head = wrap(self.head)


def test_cdep_trains_through_old_style_weight_norm_as_through_the_parametrized_one():
    # the pre-hook of old-style weight_norm makes CDEP decompose after the ordinary forward (it crashed at step
    # 2 when the decomposition replaced that forward); the parametrized one shares the forward: same training
    moved = {}
    for norm in ("old weight_norm", "weight_norm"):
        model = bind(NormedCNNBody)(norm)
        penalty = ExplanationPenalty("cdep", weight=2.0)
        trainer(max_steps=3, callbacks=[penalty]).fit(model, loader(cnn_batch(24), 8))
        moved[norm] = (penalty.steps_sharing_forward, model.features[0].weight.detach().clone(), model.head)
    assert moved["old weight_norm"][0] == 0 and moved["weight_norm"][0] == 3
    torch.testing.assert_close(moved["old weight_norm"][1], moved["weight_norm"][1], atol=1e-6, rtol=1e-5)
    old, new = moved["old weight_norm"][2], moved["weight_norm"][2]
    torch.testing.assert_close(old.weight_g, new.parametrizations.weight.original0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(old.weight_v, new.parametrizations.weight.original1, atol=1e-6, rtol=1e-5)


def test_cdep_keeps_training_the_weight_under_old_style_spectral_norm():
    # spectral_norm's pre-hook recomputes the weight from weight_orig; without it the weight went stale and
    # weight_orig stopped updating
    model = bind(NormedCNNBody)("old spectral_norm")
    before = model.head.weight_orig.detach().clone()
    penalty = ExplanationPenalty("cdep", weight=2.0)
    steps = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            steps.append(pl_module.head.weight_orig.detach().clone())

    trainer(max_steps=3, callbacks=[penalty, Watch()]).fit(model, loader(cnn_batch(24), 8))
    assert penalty.steps_sharing_forward == 0 and penalty.steps_seen == 3
    for previous, current in zip([before, *steps], steps):
        assert (current - previous).abs().max() > 1e-6  # weight_orig moves on every step
