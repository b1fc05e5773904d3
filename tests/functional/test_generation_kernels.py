"""Faithfulness kernels for generations, on constructed causal LMs whose answers are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_xai.attribution.generation import EMBEDDING_SPACE_METHODS, attribute_generation
from lightning_xai.datasets import word_tokenizer
from lightning_xai.datasets.planted_association import PlantedAssociation
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import generation as G
from lightning_xai.metrics import AttributionAgreement, GenerationFaithfulness
from tests.helpers import tiny_gpt2


class CopyFirstToken(nn.Module):
    """A causal LM whose every next token copies the *first* prompt token (a known, position-0 dependence)."""

    def __init__(self, vocab: int = 12) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embedding.weight.copy_(8 * torch.eye(vocab))

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        embeds = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        return embeds[:, :1].expand_as(embeds)  # logits at every position: those of token 0


PROMPT = G.PromptFeatures(torch.tensor([5, 2, 3, 4]), baseline_id=0)
TARGET = torch.tensor([5, 5])
RIGHT = torch.tensor([1.0, 0.0, 0.0, 0.0])  # the first token carries everything
WRONG = torch.tensor([-1.0, 0.0, 0.0, 1.0])  # ranks the first token last


@pytest.mark.parametrize(
    ("kernel", "margin"),
    [  # positive margin: higher is better; AUCs lie in [0, 1], the others are in nats
        (G.generation_comprehensiveness, 1.0),
        (G.generation_sufficiency, -1.0),
        (G.generation_log_odds, -1.0),
        (G.generation_deletion_auc, -0.3),
        (G.generation_insertion_auc, 0.3),
    ],
)
def test_the_true_attribution_scores_better_than_a_wrong_one(kernel, margin):
    model = CopyFirstToken()
    right = kernel(model, [PROMPT], [TARGET], [RIGHT])
    wrong = kernel(model, [PROMPT], [TARGET], [WRONG])
    assert ((right - wrong) * (1 if margin > 0 else -1) > abs(margin)).all()


def test_known_values_of_the_copy_model():
    model = CopyFirstToken()
    full = G.target_token_log_probs(model, [PROMPT.ids], [TARGET]).sum()
    without_first = G.target_token_log_probs(model, [PROMPT.ids_without(RIGHT == 0)], [TARGET]).sum()
    # removing the copied token costs exactly its log-probability gap, at every fraction
    value = G.generation_comprehensiveness(model, [PROMPT], [TARGET], [RIGHT], fractions=(0.25, 0.5))
    torch.testing.assert_close(value, (full - without_first)[None])
    assert G.generation_sufficiency(model, [PROMPT], [TARGET], [RIGHT], fractions=(0.25,)).abs().max() < 1e-6
    assert G.generation_comprehensiveness(model, [PROMPT], [TARGET], [WRONG], fractions=(0.25,)).abs().max() < 1e-6


def test_per_token_variant_ranks_features_per_output_token():
    model = CopyFirstToken()
    right = torch.stack([RIGHT, RIGHT])
    mixed = torch.stack([RIGHT, WRONG])  # right for the first output token only
    r = G.generation_comprehensiveness(model, [PROMPT], [TARGET], [right], fractions=(0.25,))
    m = G.generation_comprehensiveness(model, [PROMPT], [TARGET], [mixed], fractions=(0.25,))
    torch.testing.assert_close(m, r / 2)


def test_prompts_of_different_lengths_in_one_batch_equal_one_at_a_time():
    model = CopyFirstToken()
    other = G.PromptFeatures(torch.tensor([7, 1]), baseline_id=0)
    together = G.generation_deletion_auc(
        model, [PROMPT, other], [TARGET, torch.tensor([7])], [RIGHT, torch.tensor([0.2, 0.9])], batch_size=3
    )
    alone = torch.cat(
        [
            G.generation_deletion_auc(model, [PROMPT], [TARGET], [RIGHT]),
            G.generation_deletion_auc(model, [other], [torch.tensor([7])], [torch.tensor([0.2, 0.9])]),
        ]
    )
    torch.testing.assert_close(together, alone)


def test_padding_does_not_change_gpt2_log_probs():
    tokenizer = word_tokenizer(PlantedAssociation.vocabulary())
    model = tiny_gpt2(tokenizer)
    prompts = [torch.tensor(tokenizer.encode(p)) for p in ("today alice works as a", "i heard bruno")]
    targets = [torch.tensor(tokenizer.encode("nurse .")), torch.tensor(tokenizer.encode("works as a pilot"))]
    together = G.target_token_log_probs(model, prompts, targets)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        logits = model(torch.cat([prompt, target])[None]).logits[0].log_softmax(-1)
        expected = logits[prompt.numel() - 1 : -1].gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(together[row, : target.numel()], expected, atol=1e-5, rtol=1e-5)
        assert (together[row, target.numel() :] == 0).all()


def test_embedding_space_matches_token_ablation_at_alpha_one():
    tokenizer = word_tokenizer(PlantedAssociation.vocabulary())
    model = tiny_gpt2(tokenizer)
    results = attribute_generation(model, tokenizer, ["today alice works as a", "i heard greta"], ["nurse", "works"])
    scores = G.InterpolatedPrompts(
        model, model.get_input_embeddings(), [r.prompt_features for r in results], [r.target_ids for r in results]
    )
    alpha = EMBEDDING_SPACE_METHODS["feature_ablation"](scores, scores.ones())
    for row, result in enumerate(results):
        torch.testing.assert_close(alpha[row, : result.seq_attr.numel()], result.seq_attr, atol=1e-5, rtol=1e-4)
    lig = attribute_generation(
        model,
        tokenizer,
        ["today alice works as a"],
        ["nurse"],
        "layer_integrated_gradients",
        method_kwargs={"n_steps": 16},
    )[0]
    single = G.InterpolatedPrompts(model, model.get_input_embeddings(), [lig.prompt_features], [lig.target_ids])
    ig = EMBEDDING_SPACE_METHODS["layer_integrated_gradients"](single, single.ones(), n_steps=16)
    torch.testing.assert_close(ig[0], lig.seq_attr, atol=1e-5, rtol=1e-3)


def test_infidelity_prefers_the_ablation_attribution_and_sensitivity_is_the_radius_for_a_linear_model():
    tokenizer = word_tokenizer(PlantedAssociation.vocabulary())
    model = tiny_gpt2(tokenizer)
    result = attribute_generation(model, tokenizer, ["everyone knows alice works as a"], ["nurse ."])[0]
    metric = GenerationFaithfulness("infidelity", seed=0)
    shuffled = result.seq_attr[torch.randperm(result.seq_attr.numel(), generator=torch.Generator().manual_seed(0))]
    values = []
    for attribution in (result.seq_attr, shuffled):
        metric.reset()  # re-seeds: both attributions meet the same perturbations
        metric.update(
            model, [result.prompt_features], [result.target_ids], [attribution], embedding=model.get_input_embeddings()
        )
        values.append(float(metric.compute()))
    assert values[0] < values[1]

    class Linear(CopyFirstToken):  # log p of token 5 is linear in the presence of token 0's embedding
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
            embeds = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
            logits = torch.zeros(*embeds.shape[:2], 12)
            logits[..., 5] = embeds[:, :1, 5].expand(-1, embeds.shape[1])
            logits[..., 6] = 1e4  # log p(5) = logit(5) - 1e4 + O(e^-1e4): linear
            return logits

    model = Linear()
    scores = G.InterpolatedPrompts(model, model.embedding, [PROMPT], [TARGET])
    sensitivity = G.generation_sensitivity_max(scores, EMBEDDING_SPACE_METHODS["layer_integrated_gradients"])
    ablation = G.generation_sensitivity_max(scores, EMBEDDING_SPACE_METHODS["feature_ablation"])
    # for a function linear in the presence of one feature, both explanations scale with that presence: the
    # largest relative change is the perturbation radius (0.02) itself
    assert 0.0 < float(ablation) <= 0.0201 and 0.0 < float(sensitivity) <= 0.0201


def test_embedding_space_metrics_of_a_prompt_do_not_depend_on_the_other_prompts():
    tokenizer = word_tokenizer(PlantedAssociation.vocabulary())
    model = tiny_gpt2(tokenizer)
    results = attribute_generation(model, tokenizer, ["today alice works as a", "i heard greta"], ["nurse", "works"])
    embedding = model.get_input_embeddings()
    both = G.InterpolatedPrompts(
        model, embedding, [r.prompt_features for r in results], [r.target_ids for r in results]
    )
    together = G.generation_infidelity(both, [r.seq_attr for r in results])
    alone = G.InterpolatedPrompts(model, embedding, [results[1].prompt_features], [results[1].target_ids])
    torch.testing.assert_close(together[1:], G.generation_infidelity(alone, [results[1].seq_attr]))
    explain = EMBEDDING_SPACE_METHODS["feature_ablation"]
    torch.testing.assert_close(
        G.generation_sensitivity_max(both, explain)[1:], G.generation_sensitivity_max(alone, explain)
    )


def test_agreement_of_identical_and_reversed_rankings():
    metric = AttributionAgreement(absolute=False)
    metric.update([torch.tensor([1.0, 2, 3])], [torch.tensor([10.0, 20, 30])])
    metric.update([torch.tensor([1.0, 2, 3, 4])], [torch.tensor([4.0, 3, 2, 1])])
    metric.update([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 2.0])])  # constant: left out
    assert float(metric.compute()) == pytest.approx(0.0)
    assert int(metric.count) == 2


def test_bad_input_is_named():
    model = CopyFirstToken()
    with pytest.raises(XAIConfigurationError, match="one score per prompt feature"):
        G.generation_comprehensiveness(model, [PROMPT], [TARGET], [torch.ones(3)])
    with pytest.raises(XAIConfigurationError, match="empty target"):
        G.generation_sufficiency(model, [PROMPT], [torch.tensor([], dtype=torch.long)], [RIGHT])
    with pytest.raises(XAIConfigurationError, match="baseline token"):
        G.InterpolatedPrompts(model, model.embedding, [G.PromptFeatures(torch.tensor([1, 2]))], [TARGET])
    with pytest.raises(XAIConfigurationError, match="needs embedding"):
        GenerationFaithfulness("infidelity").update(model, [PROMPT], [TARGET], [RIGHT])
    with pytest.raises(XAIConfigurationError, match="choose one of"):
        GenerationFaithfulness("accuracy")
