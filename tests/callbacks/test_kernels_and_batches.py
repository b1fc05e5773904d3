"""Where the penalties meet PyTorch's machinery: torch.compile, scaled-dot-product attention, DataLoader collation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_xai import XAIMixin
from lightning_xai.callbacks import ConceptEffect, ExplanationPenalty, FairnessMetrics
from lightning_xai.errors import MaskShapeError, XAIConfigurationError
from lightning_xai.functional import input_x_gradient_penalty, math_attention, rrr_penalty
from lightning_xai.masks import collate_annotations, masks_from_annotations
from tests.callbacks.test_composition import CNN_TERMS, CompositionCNNBody, cnn_batch
from tests.helpers import DictDataset, bind, loader, token_decoy_data, trainer

COMPILE_STYLES = {
    # Lightning unwraps the OptimizedModule and compiles forward and the steps (from_compiled)
    "torch.compile(model)": lambda model: torch.compile(model, backend="aot_eager"),
    "model.compile()": lambda model: (model.compile(backend="aot_eager"), model)[1],
}


def _trained(model, callbacks, steps=2):
    trainer(max_steps=steps, callbacks=callbacks).fit(model, loader(cnn_batch(16), 8))


@pytest.mark.parametrize("style", sorted(COMPILE_STYLES))
def test_cdep_trains_a_compiled_module_as_it_trains_the_eager_one(style):
    # aot_eager runs aot_autograd (where model.compile() used to fail) without a C++ build; inductor behaves the
    # same (checked by hand: 1.5e-8)
    eager, compiled = bind(CompositionCNNBody)(), bind(CompositionCNNBody)()
    _trained(eager, [ExplanationPenalty("cdep")])
    penalty = ExplanationPenalty("cdep")
    _trained(COMPILE_STYLES[style](compiled), [penalty])
    assert penalty.steps_seen == 2 and penalty.steps_sharing_forward == 0  # the compiled forward stays compiled
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


REFUSING = {
    "rrr": (lambda: CNN_TERMS["rrr"](), "double backward"),
    "input_x_gradient": (lambda: CNN_TERMS["input_x_gradient"](), "double backward"),
    "expected_gradients": (lambda: CNN_TERMS["expected_gradients"](), "double backward"),
    "mutual_information": (lambda: CNN_TERMS["mutual_information"](), "forward hook"),
    "adversary": (lambda: CNN_TERMS["adversary"](), "forward hook"),
    "control": (lambda: CNN_TERMS["control"](), "forward hook"),
    "concept_effect": (lambda: ConceptEffect("features", "gender"), "forward hook"),
    "fairness_layer": (lambda: FairnessMetrics(["sex"], [2], output_layer="head"), "forward hook"),
}


@pytest.mark.parametrize("style", sorted(COMPILE_STYLES))
@pytest.mark.parametrize("name", sorted(REFUSING))
def test_what_cannot_run_compiled_is_refused_in_setup_with_the_fix(name, style):
    make, reason = REFUSING[name]
    model = COMPILE_STYLES[style](bind(CompositionCNNBody)())
    with pytest.raises(XAIConfigurationError, match=rf"{reason}.*torch.compile.*Train the uncompiled module"):
        trainer(max_steps=1, callbacks=[make()]).fit(model, loader(cnn_batch(16), 8), loader(cnn_batch(16), 8))


class AttentionClassifierBody(XAIMixin):
    """Float sequences through nn.TransformerEncoder, whose self-attention calls scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("method", ["rrr", "input_x_gradient", "expected_gradients"])
def test_gradient_penalties_differentiate_attention_twice_on_the_math_kernel(method):
    # the fused SDPA kernel has no double backward ("derivative for aten::_scaled_dot_product_flash_attention_for_
    # cpu_backward is not implemented"); the penalty's forwards, and a step forward it reuses, run on the math one
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, 8, generator=g), torch.randint(0, 2, (8,), generator=g)
    mask = torch.zeros(8, 5, 8)
    mask[:, 1] = 1
    model = bind(AttentionClassifierBody)()
    reference = bind(AttentionClassifierBody)()
    run = trainer(max_steps=1, callbacks=[ExplanationPenalty(method, weight=3.0)])
    run.fit(model, loader(DictDataset(input=x, target=y, mask=mask), 8))
    value = run.callback_metrics[f"xai/{method}_step"].item()
    assert value > 0
    if method == "expected_gradients":
        return  # random references: the update is checked for the deterministic methods
    with math_attention():
        penalty = (
            rrr_penalty(reference, x, mask) if method == "rrr" else input_x_gradient_penalty(reference, x, mask, y)
        )
        loss = F.cross_entropy(reference(x), y) + 3.0 * penalty
        gradients = torch.autograd.grad(loss, list(reference.parameters()))
    assert value == pytest.approx(penalty.item(), rel=1e-4)
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter, before.detach() - 0.5 * gradient, atol=1e-5, rtol=1e-4)


def _span_samples(n=8):
    ids, labels, spans = token_decoy_data(n, length=8)
    # some samples without annotation (None) and one with two spans: what torch's default collate cannot stack
    spans = [None if i % 3 == 0 else s for i, s in enumerate(spans)]
    spans[1] = [(2, 3), (5, 7)]
    return [{"input_ids": ids[i], "labels": labels[i], "mask": spans[i]} for i in range(n)], ids, spans


def test_token_spans_and_missing_masks_reach_the_penalty_through_a_dataloader():
    from tests.helpers import LSTMTextClassifier

    samples, ids, spans = _span_samples()
    batch = next(iter(DataLoader(samples, batch_size=8, collate_fn=collate_annotations)))
    assert batch["input_ids"].shape == (8, 8) and batch["mask"] == spans
    expected, annotated = masks_from_annotations(spans, ids)
    assert annotated.tolist() == [0.0 if i % 3 == 0 else 1.0 for i in range(8)]
    assert expected[1].tolist() == [0, 0, 1, 0, 0, 1, 1, 0]
    values = {}
    for name, masks in (("spans", None), ("tensor", expected * annotated[:, None])):
        data = samples if masks is None else [{**s, "mask": masks[i]} for i, s in enumerate(samples)]
        torch.manual_seed(0)
        run = trainer(max_steps=1, callbacks=[ExplanationPenalty("rrr", weight=1.0)])
        run.fit(LSTMTextClassifier(), DataLoader(data, batch_size=8, collate_fn=collate_annotations))
        values[name] = run.callback_metrics["xai/rrr_step"].item()
    assert values["spans"] > 0 and values["spans"] == pytest.approx(values["tensor"], rel=1e-6)


def test_default_collated_spans_are_read_and_a_wrong_list_names_the_collate_helper():
    ids, _, spans = token_decoy_data(4, length=8)  # one span per sample: default_collate transposes them
    collated = torch.utils.data.default_collate([{"mask": s} for s in spans])["mask"]
    assert len(collated) == 1  # [[starts (4,), ends (4,)]]
    mask, annotated = masks_from_annotations(collated, ids)
    torch.testing.assert_close(mask, masks_from_annotations(spans, ids)[0])
    with pytest.raises(MaskShapeError, match="collate_fn=lightning_xai.masks.collate_annotations"):
        masks_from_annotations([[(2, 3)], None], ids)
