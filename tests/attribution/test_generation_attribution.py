"""Attribution of generations: our batched path against Captum's LLMAttribution / LLMGradientAttribution."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    FeatureAblation,
    LayerIntegratedGradients,
    LLMAttribution,
    LLMGradientAttribution,
    ShapleyValueSampling,
    TextTemplateInput,
    TextTokenInput,
)

from lightning_xai.attribution.generation import (
    GENERATION_METHODS,
    attribute_generation,
    baseline_token_id,
    generate_greedy,
)
from lightning_xai.datasets import word_tokenizer
from lightning_xai.datasets.planted_association import PlantedAssociation
from lightning_xai.errors import XAIConfigurationError
from tests.helpers import tiny_gpt2

PROMPTS = ["today alice works as a", "in town bruno lives as a", "everyone knows greta works as a"]
TARGETS = ["nurse .", "pilot", "baker . <eos>"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(PlantedAssociation.vocabulary())


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(tokenizer, seed=0)


def _captum_reference(model, tokenizer, prompt, target, **kwargs):
    inp = TextTokenInput(prompt, tokenizer, baselines=tokenizer.pad_token_id)
    return LLMAttribution(FeatureAblation(model), tokenizer).attribute(inp, target=target, **kwargs)


def test_batched_feature_ablation_equals_captum_per_prompt(model, tokenizer):
    results = attribute_generation(model, tokenizer, PROMPTS, TARGETS, "feature_ablation")
    for prompt, target, result in zip(PROMPTS, TARGETS, results):
        reference = _captum_reference(model, tokenizer, prompt, target, forward_in_tokens=False)
        torch.testing.assert_close(result.seq_attr, reference.seq_attr.cpu(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(result.token_attr, reference.token_attr.cpu(), atol=2e-6, rtol=1e-5)
        assert result.features == prompt.split()
        assert result.output_tokens == target.split()


def test_single_pass_equals_uncached_decoding_and_the_cached_path_does_not(model, tokenizer):
    """DESIGN.md: Captum 0.9's cached path is wrong on transformers >= 5.3; check it on the installed one."""
    ours = attribute_generation(model, tokenizer, PROMPTS, TARGETS, "feature_ablation")
    cached_error = 0.0
    for prompt, target, result in zip(PROMPTS, TARGETS, ours):
        uncached = _captum_reference(model, tokenizer, prompt, target, use_cached_outputs=False)
        cached = _captum_reference(model, tokenizer, prompt, target, use_cached_outputs=True)
        torch.testing.assert_close(result.seq_attr, uncached.seq_attr.cpu(), atol=2e-6, rtol=1e-5)
        cached_error = max(cached_error, float((cached.seq_attr - uncached.seq_attr).abs().max()))
    # measured 2.7e-3 on attributions of size 0.15 with transformers 5.x; if this fails, Captum's cached path was
    # fixed and may be offered again (DESIGN.md)
    assert cached_error > 1e-3


def test_layer_integrated_gradients_equals_captum(model, tokenizer):
    results = attribute_generation(
        model, tokenizer, PROMPTS, TARGETS, "layer_integrated_gradients", method_kwargs={"n_steps": 8}
    )
    for prompt, target, result in zip(PROMPTS, TARGETS, results):
        inp = TextTokenInput(prompt, tokenizer, baselines=tokenizer.pad_token_id)
        method = LayerIntegratedGradients(model, model.get_input_embeddings())
        reference = LLMGradientAttribution(method, tokenizer).attribute(inp, target=target, n_steps=8)
        torch.testing.assert_close(result.token_attr, reference.token_attr.cpu(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(result.seq_attr, reference.seq_attr.cpu(), atol=1e-6, rtol=1e-4)


def test_shapley_sampling_batched_matches_captum_with_the_same_permutations(model, tokenizer):
    torch.manual_seed(3)
    ours = attribute_generation(
        model, tokenizer, PROMPTS[:1], TARGETS[:1], "shapley_value_sampling", method_kwargs={"n_samples": 4}
    )[0]
    torch.manual_seed(3)
    inp = TextTokenInput(PROMPTS[0], tokenizer, baselines=tokenizer.pad_token_id)
    reference = LLMAttribution(ShapleyValueSampling(model), tokenizer).attribute(
        inp, target=TARGETS[0], forward_in_tokens=False, n_samples=4
    )
    torch.testing.assert_close(ours.seq_attr, reference.seq_attr.cpu(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(GENERATION_METHODS))
def test_every_method_runs_on_gpt2_and_gives_one_score_per_feature(model, tokenizer, method):
    options = {"n_samples": 8} if method in ("kernel_shap", "lime", "shapley_value_sampling") else {}
    results = attribute_generation(model, tokenizer, PROMPTS, TARGETS, method, method_kwargs=options)
    for prompt, target, result in zip(PROMPTS, TARGETS, results):
        assert result.seq_attr.shape == (len(prompt.split()),)
        assert torch.isfinite(result.seq_attr).all() and result.seq_attr.abs().sum() > 0
        if GENERATION_METHODS[method].per_token:
            assert result.token_attr.shape == (len(target.split()), len(prompt.split()))
            torch.testing.assert_close(result.token_attr.sum(0), result.seq_attr, atol=1e-5, rtol=1e-4)
        else:
            assert result.token_attr is None


def test_greedy_generation_in_one_batch_equals_huggingface_generate_per_prompt(model, tokenizer):
    prompts = [torch.tensor(tokenizer.encode(p)) for p in PROMPTS]
    ours = generate_greedy(model, prompts, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id)
    for prompt, generated in zip(prompts, ours):
        reference = model.generate(
            prompt[None],
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        expected = reference[0, prompt.numel() :]
        eos = (expected == tokenizer.eos_token_id).nonzero()
        if eos.numel() and eos[0, 0] > 0:
            expected = expected[: eos[0, 0]]
        assert generated.tolist() == expected.tolist()


def test_generation_is_explained_when_no_target_is_given(model, tokenizer):
    results = attribute_generation(model, tokenizer, PROMPTS, None, max_new_tokens=3)
    for prompt, result in zip(PROMPTS, results):
        generated = generate_greedy(model, [torch.tensor(tokenizer.encode(prompt))], 3, tokenizer.eos_token_id)[0]
        assert result.target_ids.tolist() == generated.tolist()
        reference = _captum_reference(model, tokenizer, prompt, generated, forward_in_tokens=False)
        torch.testing.assert_close(result.seq_attr, reference.seq_attr.cpu(), atol=2e-6, rtol=1e-5)


def test_removal_drops_tokens_and_a_named_token_replaces_them(model, tokenizer):
    removed = attribute_generation(model, tokenizer, PROMPTS[:1], TARGETS[:1], baseline="remove")[0]
    keep = torch.tensor([True, False, True, True, True])
    assert removed.prompt_features.ids_without(keep).tolist() == tokenizer.encode("today works as a")
    named = attribute_generation(model, tokenizer, PROMPTS[:1], TARGETS[:1], baseline="bruno")[0]
    assert named.prompt_features.ids_without(keep).tolist() == tokenizer.encode("today bruno works as a")
    reference = LLMAttribution(FeatureAblation(model), tokenizer).attribute(
        TextTokenInput(PROMPTS[0], tokenizer, baselines="bruno"), target=TARGETS[0], forward_in_tokens=False
    )
    torch.testing.assert_close(named.seq_attr, reference.seq_attr.cpu(), atol=2e-6, rtol=1e-5)


def test_segments_follow_captum_template_inputs(model, tokenizer):
    prompt = {"template": "{} {} works as a", "values": ["everyone knows", "alice"], "baselines": ["today", "bruno"]}
    ours = attribute_generation(model, tokenizer, [prompt], ["nurse"])[0]
    inp = TextTemplateInput(prompt["template"], prompt["values"], baselines=prompt["baselines"])
    reference = LLMAttribution(FeatureAblation(model), tokenizer).attribute(
        inp, target="nurse", forward_in_tokens=False
    )
    assert ours.features == ["everyone knows", "alice"]
    torch.testing.assert_close(ours.seq_attr, reference.seq_attr.cpu(), atol=2e-6, rtol=1e-5)


def test_baseline_token_per_tokenizer(tokenizer):
    assert baseline_token_id(tokenizer) == tokenizer.pad_token_id

    class GPT2Like:  # GPT-2: no pad token; UNK and EOS are <|endoftext|>
        pad_token_id, unk_token_id, eos_token_id = None, 50256, 50256

    assert baseline_token_id(GPT2Like()) == 50256

    class Bare:
        pad_token_id = unk_token_id = eos_token_id = None

    with pytest.raises(XAIConfigurationError, match="baseline="):
        baseline_token_id(Bare())


def test_bad_input_is_named(model, tokenizer):
    with pytest.raises(XAIConfigurationError, match="unknown generation attribution method"):
        attribute_generation(model, tokenizer, PROMPTS, TARGETS, "occlusion")
    with pytest.raises(XAIConfigurationError, match="one per prompt"):
        attribute_generation(model, tokenizer, PROMPTS, TARGETS[:1])
    with pytest.raises(XAIConfigurationError, match="not segments"):
        attribute_generation(model, tokenizer, PROMPTS, TARGETS, "layer_integrated_gradients", baseline="remove")
    with pytest.raises(XAIConfigurationError, match="not a token"):
        attribute_generation(model, tokenizer, PROMPTS, TARGETS, baseline="zebra")
