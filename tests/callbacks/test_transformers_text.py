"""Explanation penalties on token spans of a Hugging Face BERT classifier (tiny random config, no download)."""

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.errors import UnsupportedLayerError, XAIConfigurationError
from lightning_xai.functional import input_x_gradient_penalty, rrr_penalty
from tests.helpers import loader, tiny_bert_config, token_decoy_data, trainer

transformers = pytest.importorskip("transformers")


class BertClassifier(XAIMixin, pl.LightningModule):
    def __init__(self, attention="eager"):
        super().__init__()
        config = tiny_bert_config(vocab_size=40)
        config._attn_implementation = attention
        torch.manual_seed(0)
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def xai_embed(self, input_ids):
        return self.bert.bert.embeddings.word_embeddings(input_ids)

    def xai_forward_from_embeddings(self, embeddings, batch):
        return self.bert(inputs_embeds=embeddings, attention_mask=batch.get("attention_mask")).logits

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _batch(n=8):
    ids, labels, spans = token_decoy_data(n, length=8)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "rationale": spans}


@pytest.mark.parametrize("method", ["rrr", "input_x_gradient", "expected_gradients"])
def test_bert_gradient_penalty_on_token_spans_adds_its_gradient(method):
    batch = _batch()
    model = BertClassifier()
    reference = copy.deepcopy(model)
    run = trainer(max_steps=1, callbacks=[ExplanationPenalty(method=method, weight=100.0, mask_key="rationale")])
    run.fit(model, loader([batch], 1, collate_fn=lambda items: items[0]))

    value = run.callback_metrics[f"xai/{method}_step"].item()
    assert value > 0
    if method == "expected_gradients":
        return  # random path points: the exact update is checked for the deterministic methods
    span_mask = torch.zeros(8, 8)
    span_mask[:, 2] = 1
    embeddings = reference.xai_embed(batch["input_ids"])

    def forward(e):
        return reference.xai_forward_from_embeddings(e, batch)

    penalty = (
        rrr_penalty(forward, embeddings, span_mask)
        if method == "rrr"
        else input_x_gradient_penalty(forward, embeddings, span_mask, batch["labels"])
    )
    assert value == pytest.approx(penalty.item(), rel=1e-4)
    loss = F.cross_entropy(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"]) + 100 * penalty
    gradients = torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True)
    for parameter, before, gradient in zip(model.parameters(), reference.parameters(), gradients):
        expected = before.detach() if gradient is None else before.detach() - 0.1 * gradient
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("differentiation", "encoder_calls"), [("double_backward", 1 + 1), ("finite_difference", 2 + 2 + 1)]
)
def test_bert_penalty_reuses_the_step_forward_on_its_word_embeddings(differentiation, encoder_calls):
    model = BertClassifier(attention="sdpa")
    calls = []
    model.bert.bert.encoder.register_forward_hook(lambda *_: calls.append(1))
    penalty = ExplanationPenalty("rrr", weight=100.0, mask_key="rationale", differentiation=differentiation)
    trainer(max_steps=2, callbacks=[penalty]).fit(model, loader([_batch()] * 2, 1, collate_fn=lambda items: items[0]))
    # two steps: the step's own forward on each, the finite difference's shifted one, and its one check
    assert len(calls) == encoder_calls
    assert penalty._step_embedding is model.bert.bert.embeddings.word_embeddings


def test_cdep_on_bert_raises_a_clear_unsupported_error():
    batch = _batch()
    with pytest.raises(UnsupportedLayerError, match="BertClassifier|contextual decomposition"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="cdep", mask_key="rationale")]).fit(
            BertClassifier(), loader([batch], 1, collate_fn=lambda items: items[0])
        )


def test_sdpa_attention_trains_on_the_math_kernel_and_flash_attention_is_refused():
    # SDPA's fused CPU kernel has no double backward; the penalty's forward runs it on the math kernel instead,
    # which gives the eager attention's numbers
    batch = _batch()
    results = {}
    for attention in ("eager", "sdpa"):
        model = BertClassifier(attention=attention)
        run = trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", weight=100.0, mask_key="rationale")])
        run.fit(model, loader([batch], 1, collate_fn=lambda items: items[0]))
        results[attention] = (run.callback_metrics["xai/rrr_step"].item(), list(model.parameters()))
    assert results["sdpa"][0] == pytest.approx(results["eager"][0], rel=1e-4)
    for sdpa, eager in zip(results["sdpa"][1], results["eager"][1]):
        torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)

    flash = BertClassifier()
    flash.bert.config._attn_implementation = "flash_attention_2"
    with pytest.raises(XAIConfigurationError, match="attn_implementation='sdpa'"):
        trainer(max_steps=1, callbacks=[ExplanationPenalty(method="rrr", mask_key="rationale")]).fit(
            flash, loader([batch], 1, collate_fn=lambda items: items[0])
        )
