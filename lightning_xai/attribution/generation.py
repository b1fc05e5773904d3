"""Attribution of a causal language model's generations to its prompt, through Captum.

:func:`attribute_generation` explains the log-probability of a target (given, or the model's own greedy
generation) by the prompt's tokens or by user-defined segments (Captum's ``TextTokenInput`` /
``TextTemplateInput``), with Captum's perturbation methods (``FeatureAblation``, ``ShapleyValueSampling``,
``KernelShap``, ``Lime``) or its layer-gradient methods on the embedding layer (``LayerIntegratedGradients``,
``LayerGradientXActivation``). It computes what ``captum.attr.LLMAttribution(...).attribute(inp, target,
forward_in_tokens=False)`` and ``LLMGradientAttribution`` compute, with two differences:

* **Several prompts at once.** Captum's LLM wrappers take one prompt per call. Here the Captum method runs
  on a batch of prompts: its forward function packs every perturbed prompt with its target into one padded
  forward pass (right padding and an attention mask). ``FeatureAblation`` then costs ``F_max + 1`` forward
  passes of ``P`` rows instead of ``sum_i (F_i + 1)`` passes of one row. ``KernelShap`` and ``Lime`` fit one
  surrogate per prompt (Captum's batched path shares one sample set across prompts), so they run prompt by prompt.
* **One teacher-forced pass per perturbation.** Captum 0.9's default (``use_cached_outputs=True`` with
  ``forward_in_tokens=True``) decodes the target token by token through the model's KV cache; on transformers 5
  that path gives attributions that differ from an uncached reference by up to 30 % (the test suite compares
  them). The single pass of ``prompt + target`` gives the uncached numbers at ``1/T`` of the cost.

Baselines: removed tokens become the tokenizer's pad token, else its UNK, else its EOS token
(:func:`baseline_token_id`; token id 0 is a printable token for GPT-2), a token you name, or are dropped
(``baseline="remove"``). Segment prompts use their ``TextTemplateInput`` baselines: ``""`` (removal) by default,
fixed strings, or a distribution of replacement values (``captum.attr.ProductBaselines``), sampled anew for
every perturbation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import (
    FeatureAblation,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Lime,
    ProductBaselines,
    ShapleyValueSampling,
    TextTemplateInput,
    TextTokenInput,
)
from captum.attr._utils.interpretable_input import InterpretableInput
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.generation import (
    PromptFeatures,
    _call,
    _log_probs_of,
    causal_lm_logits,
    pack_prompts_and_targets,
)

__all__ = [
    "EMBEDDING_SPACE_METHODS",
    "GENERATION_METHODS",
    "GenerationAttribution",
    "attribute_generation",
    "baseline_token_id",
    "generate_greedy",
    "prompt_features",
    "replaces_tokens",
    "resolve_targets",
]

#: the id a removed token gets under ``baseline="remove"``; dropped from the sequence before the forward pass
REMOVED = -1

Prompt = str | InterpretableInput | Mapping[str, Any]


@dataclass(frozen=True)
class _Method:
    """How a Captum method is run: its class, whether it explains several prompts in one call, whether it gives
    per-output-token attributions, and whether it perturbs prompt features (else: gradients at the embeddings)."""

    captum_class: type
    batched: bool
    per_token: bool
    perturbation: bool = True
    #: constructor options beyond the forward function, made fresh per call
    constructor: Callable[[], dict[str, Any]] = dict

    def build(self, forward: Any, *layer: nn.Module) -> Any:
        return self.captum_class(forward, *layer, **self.constructor())


def _least_squares_surrogate() -> dict[str, Any]:
    # Captum's default surrogate, a Lasso with alpha 0.01, zeroes the attributions of log-probabilities, whose
    # effects are a few hundredths of a nat on small models: fit ordinary least squares instead
    from captum._utils.models.linear_model import SkLearnLinearRegression

    return {"interpretable_model": SkLearnLinearRegression()}


#: method name -> how it runs; every method is Captum's own
GENERATION_METHODS: dict[str, _Method] = {
    "feature_ablation": _Method(FeatureAblation, batched=True, per_token=True),
    "shapley_value_sampling": _Method(ShapleyValueSampling, batched=True, per_token=True),
    "kernel_shap": _Method(KernelShap, batched=False, per_token=False),
    "lime": _Method(Lime, batched=False, per_token=False, constructor=_least_squares_surrogate),
    "layer_integrated_gradients": _Method(LayerIntegratedGradients, batched=True, per_token=True, perturbation=False),
    "layer_gradient_x_activation": _Method(LayerGradientXActivation, batched=True, per_token=True, perturbation=False),
}


@dataclass
class GenerationAttribution:
    """The attribution of one prompt's target.

    Attributes:
        prompt: the prompt's text.
        features: the label of each interpretable feature (a token, or a segment's value).
        output_tokens: the target's tokens as text.
        target_ids: ``(T,)`` the target's token ids.
        seq_attr: ``(F,)`` attribution of the target's log-probability to each feature.
        token_attr: ``(T, F)`` attribution of each output token's log-probability (``None`` for KernelShap and
            Lime, which explain the whole target only).
        method: the method's name.
        prompt_features: the prompt as the faithfulness kernels of
            :mod:`lightning_xai.functional.generation` take it.
    """

    prompt: str
    features: list[str]
    output_tokens: list[str]
    target_ids: Tensor
    seq_attr: Tensor
    token_attr: Tensor | None
    method: str
    prompt_features: PromptFeatures

    def top_features(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` features with the largest attribution, with their values."""
        order = torch.argsort(self.seq_attr, descending=True, stable=True)[:k]
        return [(self.features[i], float(self.seq_attr[i])) for i in order.tolist()]


def baseline_token_id(tokenizer: Any) -> int:
    """The token a removed prompt token becomes: the tokenizer's pad token, else its UNK, else its EOS token.

    GPT-2 has neither pad nor a distinct UNK token, so removed tokens become ``<|endoftext|>`` (id 50256), which
    also marks a document boundary: nothing before it informs what follows.

    Raises:
        XAIConfigurationError: the tokenizer has none of the three; name a token with ``baseline=``.
    """
    for attribute in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    raise XAIConfigurationError(
        f"{type(tokenizer).__name__} has no pad, UNK or EOS token to replace removed prompt tokens with; pass "
        "baseline=<a token or its id> (or baseline='remove' to drop removed tokens)."
    )


def _token_baseline(tokenizer: Any, baseline: int | str | None) -> int:
    if baseline is None:
        return baseline_token_id(tokenizer)
    if baseline == "remove":
        return REMOVED
    if isinstance(baseline, str):
        token_id = tokenizer.convert_tokens_to_ids(baseline)
        unknown = token_id is None or (token_id == tokenizer.unk_token_id and baseline != tokenizer.unk_token)
        if unknown:
            raise XAIConfigurationError(
                f"baseline={baseline!r} is not a token of {type(tokenizer).__name__}; name one of its tokens, give "
                "an id, 'remove', or None for the tokenizer's pad/UNK/EOS token."
            )
        return int(token_id)
    return int(baseline)


def as_interpretable_input(prompt: Prompt, tokenizer: Any, baseline: int | str | None = None) -> InterpretableInput:
    """A Captum ``InterpretableInput`` for ``prompt``: text (token features), a ``{"template", "values",
    "baselines"}`` mapping (segment features: Captum's ``TextTemplateInput``), or a Captum input as it is.

    A mapping's ``baselines`` is a list of strings (one replacement per segment), a list of lists (candidates per
    segment: Captum's ``ProductBaselines`` samples one per perturbation), a ``ProductBaselines``, or None (removal).
    """
    if isinstance(prompt, InterpretableInput):
        return prompt
    if isinstance(prompt, str):
        return TextTokenInput(prompt, tokenizer, baselines=_token_baseline(tokenizer, baseline))
    if isinstance(prompt, Mapping) and "template" in prompt:
        unknown = set(prompt) - {"template", "values", "baselines", "mask", "target"}
        if unknown:
            raise XAIConfigurationError(
                f"a segment prompt has the unknown keys {sorted(unknown)}; it takes template, values, baselines, "
                "mask and target."
            )
        baselines = prompt.get("baselines")
        if isinstance(baselines, list) and baselines and all(isinstance(b, list | tuple) for b in baselines):
            # one list of candidates per segment: a replacement sampled per perturbation (YAML can say this)
            baselines = ProductBaselines([list(b) for b in baselines])
        return TextTemplateInput(prompt["template"], prompt["values"], baselines=baselines, mask=prompt.get("mask"))
    raise XAIConfigurationError(
        f"a prompt of type {type(prompt).__name__}: give text, a mapping with 'template' and 'values' (segments), or "
        "a captum TextTokenInput / TextTemplateInput."
    )


def _encode(tokenizer: Any, text: str) -> Tensor:
    return torch.as_tensor(tokenizer.encode(text, return_tensors="pt")).long().reshape(-1)


def prompt_features(inp: InterpretableInput, tokenizer: Any) -> PromptFeatures:
    """The prompt of a Captum input as the faithfulness kernels take it: its ids and how removal changes them.

    The kernels then remove features exactly as the attribution did (the same baseline token or removal for
    token prompts; for segment prompts the same re-tokenized text, with replacement values sampled anew).
    """
    if isinstance(inp, TextTokenInput):
        ids = inp.inp_tensor.reshape(-1).cpu()
        mask = torch.ones_like(ids, dtype=torch.bool) if inp.itp_mask is None else inp.itp_mask.reshape(-1).cpu()
        feature_ids = torch.where(mask, mask.long().cumsum(0) - 1, torch.full_like(ids, -1))
        baseline = None if inp.baselines == REMOVED else int(inp.baselines)
        return PromptFeatures(ids, feature_ids=feature_ids, baseline_id=baseline, num_features=inp.n_itp_features)

    perturb = _TemplatePerturbation(inp, tokenizer)
    full = perturb(torch.ones(inp.n_itp_features, dtype=torch.bool))
    return PromptFeatures(full, perturb=perturb, num_features=inp.n_itp_features)


class _TemplatePerturbation:
    """The token ids of a segment prompt with some segments replaced: a class, not a closure, so that results
    pickle (``all_gather_object`` under DDP)."""

    def __init__(self, inp: InterpretableInput, tokenizer: Any) -> None:
        self.inp, self.tokenizer = inp, tokenizer

    def __call__(self, keep: Tensor) -> Tensor:
        model_input = self.inp.to_model_input(keep.reshape(1, -1).long())
        return _encode(self.tokenizer, model_input) if isinstance(model_input, str) else model_input.reshape(-1)


def _feature_labels(inp: InterpretableInput, tokenizer: Any) -> list[str]:
    if isinstance(inp, TextTokenInput):
        return [tokenizer.convert_tokens_to_string([token]) for token in inp.values]
    return [str(value) for value in inp.values]


def _output_tokens(tokenizer: Any, ids: Tensor) -> list[str]:
    return [tokenizer.decode([i]) for i in ids.tolist()]


def generate_greedy(
    model: nn.Module,
    prompts: Sequence[Tensor],
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> list[Tensor]:
    """The greedy continuation of every prompt, up to ``max_new_tokens`` tokens or the first ``eos_token_id``.

    All prompts decode together in right-padded batches without a KV cache (each step is one teacher-forced
    pass): exact for any causal LM with or without ``generate``, and cheap at the report's sizes. A
    continuation that starts with EOS keeps that one token, so that there is always a target to explain.

    Examples:
        >>> copy = nn.Sequential(nn.Embedding(8, 8))  # next token = this token
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(torch.eye(8))
        >>> generate_greedy(copy, [torch.tensor([1, 3]), torch.tensor([5])], max_new_tokens=2)
        [tensor([3, 3]), tensor([5, 5])]
    """
    if max_new_tokens < 1:
        raise XAIConfigurationError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    generated = [torch.zeros(0, dtype=torch.long, device=p.device) for p in prompts]
    open_rows = list(range(len(prompts)))
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if not open_rows:
                break
            ids, mask, lengths = pack_prompts_and_targets(
                [prompts[r] for r in open_rows], [generated[r] for r in open_rows], pad_token_id
            )
            logits = causal_lm_logits(_call(model, ids, mask))
            last = lengths + torch.tensor([generated[r].numel() for r in open_rows], device=lengths.device) - 1
            next_tokens = logits[torch.arange(len(open_rows), device=logits.device), last.to(logits.device)].argmax(-1)
            still_open = []
            for r, token in zip(open_rows, next_tokens.tolist()):
                if token == eos_token_id and generated[r].numel():
                    continue
                generated[r] = torch.cat([generated[r], torch.tensor([token], device=generated[r].device)])
                if token != eos_token_id:
                    still_open.append(r)
            open_rows = still_open
    return generated


class _TargetLogProbs:
    """The forward function Captum perturbs: interpretable keep-rows ``(R, F_max)`` of the prompts (row ``r`` is
    prompt ``r % P``, the order Captum expands batches in) -> the targets' log-probabilities, one packed pass.

    Returns ``(R, 1 + T_max)`` (the sequence's log-probability, then each token's, as Captum's ``LLMAttribution``
    does) for per-token methods, ``(R,)`` otherwise, and ``(R,)`` of output token ``token`` when it is set
    (gradient methods attribute one output token per call, as ``LLMGradientAttribution`` does).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Sequence[InterpretableInput],
        tokenizer: Any,
        targets: Sequence[Tensor],
        per_token: bool,
        pad_token_id: int,
    ) -> None:
        self.model = model
        self.features = [prompt_features(inp, tokenizer) for inp in inputs]
        self.targets = list(targets)
        self.per_token = per_token
        self.pad_token_id = pad_token_id
        self.width = max(t.numel() for t in self.targets)
        self.token: int | None = None

    def __call__(self, keep: Tensor) -> Tensor:
        n = len(self.features)
        prompts, targets = [], []
        for r in range(keep.shape[0]):
            features = self.features[r % n]
            prompts.append(features.ids_without(keep[r, : features.num_features] == 1))
            targets.append(self.targets[r % n])
        log_probs = _log_probs_of(self.model, prompts, targets, self.pad_token_id, self.width)
        if self.token is not None:
            return log_probs[:, self.token]
        if self.per_token:
            return torch.cat([log_probs.sum(1, keepdim=True), log_probs], dim=1)
        return log_probs.sum(1)


def _perturbation(
    spec: _Method, score: _TargetLogProbs, keep: Tensor, kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """``(P, F_max)`` sequence and ``(P, T_max, F_max)`` per-token attributions of a perturbation method."""
    with torch.no_grad():
        attributions = spec.build(score).attribute(keep, baselines=0, **kwargs)
    if not spec.per_token:
        return attributions.reshape(keep.shape), None
    # FeatureAblation flattens (P, 1 + T) outputs to (P * (1 + T), F); Shapley keeps (P, 1 + T, F)
    attributions = attributions.reshape(keep.shape[0], 1 + score.width, keep.shape[1])
    return attributions[:, 0], attributions[:, 1:]


def _gradient(
    spec: _Method,
    score: _TargetLogProbs,
    keep: Tensor,
    embeddings: nn.Module,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """Layer-gradient attributions at the embedding layer, one output token per call (as Captum's
    ``LLMGradientAttribution``), summed over the embedding dimension and read at each prompt's feature tokens."""
    method = spec.build(score, embeddings)
    per_token = torch.zeros(keep.shape[0], score.width, keep.shape[1])
    with torch.enable_grad():
        for token in range(score.width):
            score.token = token
            layer = method.attribute(keep, **kwargs).detach().sum(-1)
            for i, features in enumerate(score.features):
                # feature ids ascend with position, so the positions of features 0, 1, ... in order
                positions = (features.feature_ids >= 0).nonzero()[:, 0].to(layer.device)
                per_token[i, token, : positions.numel()] = layer[i, positions].float().cpu()
    score.token = None
    return per_token.sum(1), per_token


def replaces_tokens(inp: InterpretableInput) -> bool:
    """Whether ``inp`` has token features whose removal replaces them by a baseline token (not segments, not
    ``baseline="remove"``): what gradient methods and the embedding-space metrics need."""
    return isinstance(inp, TextTokenInput) and inp.baselines != REMOVED


def _check_gradient_inputs(inputs: Sequence[InterpretableInput], name: str) -> None:
    for inp in inputs:
        if not replaces_tokens(inp):
            raise XAIConfigurationError(
                f"method={name!r} attributes at the token embeddings, which needs token prompts whose removed tokens "
                "are replaced (not segments, not baseline='remove'); use a perturbation method "
                f"({', '.join(n for n, m in GENERATION_METHODS.items() if m.perturbation)}) for segments or removal."
            )


def attribute_generation(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    targets: Sequence[str | Tensor | None] | None = None,
    method: str = "feature_ablation",
    baseline: int | str | None = None,
    max_new_tokens: int = 8,
    method_kwargs: dict[str, Any] | None = None,
    embedding_layer: nn.Module | None = None,
    num_trials: int = 1,
) -> list[GenerationAttribution]:
    """Attributes each prompt's target (or greedy generation) to the prompt's features with a Captum method.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...)`` returns logits), in eval mode.
        tokenizer: its Hugging Face tokenizer (Captum's inputs need ``encode`` and ``convert_ids_to_tokens``).
        prompts: text (its tokens are the features), a mapping ``{"template": "{} works as a", "values":
            ["Alice"], "baselines": ["someone"]}`` (segments, Captum's ``TextTemplateInput``), or a Captum input.
        targets: one target per prompt (text, token ids, or None to explain the greedy generation); None for all
            generated. A mapping prompt may carry its own ``"target"``.
        method: a name of :data:`GENERATION_METHODS`.
        baseline: for text prompts, what a removed token becomes: None (:func:`baseline_token_id`), a token, an
            id, or ``"remove"``.
        max_new_tokens: the bound of greedy generation.
        method_kwargs: options of the Captum method's ``attribute`` (``n_samples``, ``n_steps``,
            ``perturbations_per_eval``, ...).
        embedding_layer: the layer gradient methods attribute at; ``model.get_input_embeddings()`` by default.
        num_trials: perturbation methods: the mean over this many runs, as Captum's ``LLMAttribution`` has it
            (for sampled replacement values and sampling methods; seed Python's ``random`` and torch to repeat a run).

    Returns:
        one :class:`GenerationAttribution` per prompt.

    Raises:
        XAIConfigurationError: an unknown method, a gradient method on segments or removal, a target list of the
            wrong length, or an empty target.
    """
    spec = GENERATION_METHODS.get(method)
    if spec is None:
        raise XAIConfigurationError(
            f"unknown generation attribution method {method!r}; choose from {sorted(GENERATION_METHODS)}."
        )
    if targets is not None and len(targets) != len(prompts):
        raise XAIConfigurationError(
            f"{len(prompts)} prompts but {len(targets)} targets; give one per prompt (None generates)."
        )
    inputs = [as_interpretable_input(prompt, tokenizer, baseline) for prompt in prompts]
    target_ids = resolve_targets(model, tokenizer, prompts, targets, max_new_tokens, baseline)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    if not spec.perturbation:
        _check_gradient_inputs(inputs, method)
    kwargs = dict(method_kwargs or {})
    groups = [list(range(len(inputs)))] if spec.batched else [[i] for i in range(len(inputs))]
    results: list[GenerationAttribution | None] = [None] * len(inputs)
    for group in groups:
        members = [inputs[i] for i in group]
        score = _TargetLogProbs(model, members, tokenizer, [target_ids[i] for i in group], spec.per_token, pad_id)
        keep = torch.ones(len(group), max(inp.n_itp_features for inp in members))
        if spec.perturbation:
            trials = [_perturbation(spec, score, keep, kwargs) for _ in range(max(1, int(num_trials)))]
            seq = torch.stack([t[0] for t in trials]).mean(0)
            per_token = None if trials[0][1] is None else torch.stack([t[1] for t in trials]).mean(0)
        else:
            layer = embedding_layer if embedding_layer is not None else model.get_input_embeddings()
            seq, per_token = _gradient(spec, score, keep, layer, kwargs)
        for row, i in enumerate(group):
            features, tokens = inputs[i].n_itp_features, target_ids[i].numel()
            results[i] = GenerationAttribution(
                prompt=_prompt_text(inputs[i], tokenizer),
                features=_feature_labels(inputs[i], tokenizer),
                output_tokens=_output_tokens(tokenizer, target_ids[i]),
                target_ids=target_ids[i].cpu(),
                seq_attr=seq[row, :features].float().cpu(),
                token_attr=None if per_token is None else per_token[row, :tokens, :features].float().cpu(),
                method=method,
                prompt_features=score.features[row],
            )
    return [r for r in results if r is not None]


def _prompt_text(inp: InterpretableInput, tokenizer: Any) -> str:
    model_input = inp.to_model_input()
    return model_input if isinstance(model_input, str) else tokenizer.decode(model_input.reshape(-1).tolist())


def resolve_targets(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    targets: Sequence[str | Tensor | None] | None = None,
    max_new_tokens: int = 8,
    baseline: int | str | None = None,
) -> list[Tensor]:
    """The target token ids of every prompt: a given target encoded (a mapping's ``"target"`` first), or the
    greedy generation of the prompts without one (all generated in one batch).

    Raises:
        XAIConfigurationError: a given target has no tokens.
    """
    inputs = [as_interpretable_input(prompt, tokenizer, baseline) for prompt in prompts]
    wanted = list(targets) if targets is not None else [None] * len(prompts)
    wanted = [p.get("target", t) if isinstance(p, Mapping) else t for p, t in zip(prompts, wanted)]
    device = next(model.parameters()).device
    ids: list[Tensor | None] = []
    for i, target in enumerate(wanted):
        if target is None:
            ids.append(None)
            continue
        encoded = (
            torch.as_tensor(tokenizer.encode(target, add_special_tokens=False) if isinstance(target, str) else target)
            .long()
            .reshape(-1)
        )
        if encoded.numel() == 0:
            raise XAIConfigurationError(f"the target of prompt {i} ({target!r}) has no tokens; give text to explain.")
        ids.append(encoded.to(device))
    missing = [i for i, t in enumerate(ids) if t is None]
    if missing:
        prompts = [prompt_features(inputs[i], tokenizer).ids.to(device) for i in missing]
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        for i, generated in zip(missing, generate_greedy(model, prompts, max_new_tokens, eos, pad)):
            ids[i] = generated
    return [t for t in ids if t is not None]


def _alpha_perturbation(name: str) -> Any:
    spec = GENERATION_METHODS[name]

    def explain(scores: nn.Module, alpha: Tensor, **kwargs: Any) -> Tensor:
        with torch.no_grad():
            if spec.batched:
                return spec.build(scores).attribute(alpha, baselines=0, **kwargs)
            # KernelShap and Lime fit one surrogate per row (their batched path shares one sample set)
            rows = [
                spec.build(_Row(scores, alpha, r)).attribute(alpha[r : r + 1], baselines=0, **kwargs)
                for r in range(alpha.shape[0])
            ]
            return torch.cat(rows)

    return explain


def _alpha_gradient(captum_class: type) -> Any:
    def explain(scores: nn.Module, alpha: Tensor, **kwargs: Any) -> Tensor:
        with torch.enable_grad():
            extra = {"baselines": torch.zeros_like(alpha)} if captum_class is IntegratedGradients else {}
            return captum_class(scores).attribute(alpha.detach().requires_grad_(True), **extra, **kwargs).detach()

    return explain


class _Row(nn.Module):
    """``scores`` evaluated for row ``r`` of ``alpha`` only: the other rows keep their values."""

    def __init__(self, scores: nn.Module, alpha: Tensor, row: int) -> None:
        super().__init__()
        self.scores, self.alpha, self.row = scores, alpha, row

    def forward(self, perturbed: Tensor) -> Tensor:
        rows = self.alpha.expand(perturbed.shape[0], -1, -1).clone()
        rows[:, self.row] = perturbed
        return torch.stack([self.scores(block)[self.row] for block in rows])


#: method name -> the same Captum method on the prompts' interpretable embedding space
#: (:class:`~lightning_xai.functional.generation.InterpolatedPrompts`), for max-sensitivity; called as
#: ``explain(scores, alpha, **method_kwargs)``. At ``alpha = 1`` the perturbation methods and Integrated Gradients
#: give what :func:`attribute_generation` gives; Gradient x Activation becomes Input x Gradient in that space.
EMBEDDING_SPACE_METHODS: dict[str, Any] = {
    "feature_ablation": _alpha_perturbation("feature_ablation"),
    "shapley_value_sampling": _alpha_perturbation("shapley_value_sampling"),
    "kernel_shap": _alpha_perturbation("kernel_shap"),
    "lime": _alpha_perturbation("lime"),
    "layer_integrated_gradients": _alpha_gradient(IntegratedGradients),
    "layer_gradient_x_activation": _alpha_gradient(InputXGradient),
}
