"""Faithfulness kernels for attributions of generated text: does a causal LM's output depend on the prompt features
an attribution ranks first?

The explained quantity is the log-probability of a target token sequence ``y`` given a prompt ``x``, as a causal
language model computes it in one forward pass of ``x + y`` (teacher forcing):
``log p(y | x) = sum_t log p(y_t | x, y_<t)``. A prompt is a :class:`PromptFeatures`: its token ids and a rule that
turns a keep-mask over its ``F`` interpretable features (tokens or user-defined segments) into the token ids of
the perturbed prompt. Removed features are replaced by a baseline token, or dropped from the sequence.

Features are ranked per prompt by the attribution *value*, descending (the features that raise the target's
log-probability first), ties broken by the lower index, as in :mod:`lightning_xai.functional.faithfulness`.
Every perturbed prompt of one call goes through the model in padded batches of ``batch_size`` rows (right
padding with an attention mask, so the positions of real tokens are those of the unpadded sequence).

The model is any Hugging Face-style causal LM: ``model(input_ids=..., attention_mask=...)`` returns logits
``(N, L, V)`` as a tensor, a tuple whose first entry they are, or an output with ``.logits``. Put it in
``eval()`` mode first; every kernel runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.faithfulness import _ranks, _top_count

__all__ = [
    "InterpolatedPrompts",
    "PromptFeatures",
    "causal_lm_logits",
    "generation_comprehensiveness",
    "generation_deletion_auc",
    "generation_infidelity",
    "generation_insertion_auc",
    "generation_log_odds",
    "generation_sensitivity_max",
    "generation_sufficiency",
    "pack_prompts_and_targets",
    "target_token_log_probs",
]

#: perturbed rows per forward pass when ``batch_size`` is not given
DEFAULT_ROWS = 64


@dataclass
class PromptFeatures:
    """A prompt's token ids and how removing some of its features changes them.

    Args:
        ids: ``(L,)`` token ids of the prompt.
        feature_ids: ``(L,)`` the feature of each token, ``-1`` for tokens that are never removed (a BOS token);
            ``None``: every token is its own feature.
        baseline_id: the token a removed token becomes; ``None`` drops removed tokens from the sequence.
        perturb: instead of the two rules above, ``perturb(keep) -> ids`` for a ``(F,)`` bool keep-mask (segments
            whose text is re-tokenized, sampled replacement values, ...); needs ``num_features``.
        num_features: the number of features ``F`` (derived from ``feature_ids`` when not given).

    Examples:
        >>> prompt = PromptFeatures(torch.tensor([5, 6, 7]), baseline_id=0)
        >>> prompt.ids_without(torch.tensor([True, False, True]))
        tensor([5, 0, 7])
        >>> PromptFeatures(torch.tensor([5, 6, 7])).ids_without(torch.tensor([True, False, True]))
        tensor([5, 7])
    """

    ids: Tensor
    feature_ids: Tensor | None = None
    baseline_id: int | None = None
    perturb: Callable[[Tensor], Tensor] | None = None
    num_features: int | None = None

    def __post_init__(self) -> None:
        self.ids = torch.as_tensor(self.ids).long().reshape(-1)
        if self.feature_ids is None:
            self.feature_ids = torch.arange(self.ids.numel())
        self.feature_ids = torch.as_tensor(self.feature_ids).long().reshape(-1).to(self.ids.device)
        if self.feature_ids.numel() != self.ids.numel():
            raise XAIConfigurationError(
                f"PromptFeatures: feature_ids has {self.feature_ids.numel()} entries for {self.ids.numel()} tokens; "
                "give one feature index (or -1) per token."
            )
        if self.num_features is None:
            self.num_features = int(self.feature_ids.max()) + 1 if self.feature_ids.numel() else 0
        if self.num_features < 1:
            raise XAIConfigurationError("PromptFeatures: the prompt has no features to attribute to.")

    def ids_without(self, keep: Tensor) -> Tensor:
        """The prompt's token ids with the features where ``keep`` is False removed."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
        if self.perturb is not None:
            return torch.as_tensor(self.perturb(keep)).long().reshape(-1)
        assert self.feature_ids is not None
        kept = torch.ones_like(self.ids, dtype=torch.bool)
        features = self.feature_ids >= 0
        kept[features] = keep.to(self.ids.device)[self.feature_ids[features]]
        if self.baseline_id is None:
            return self.ids[kept]
        return torch.where(kept, self.ids, torch.full_like(self.ids, int(self.baseline_id)))


def causal_lm_logits(output: object) -> Tensor:
    """The ``(N, L, V)`` logits of a causal LM's output: a tensor, a tuple (logits first) or ``.logits``."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if logits is None and isinstance(output, Tensor):
        logits = output
    if not isinstance(logits, Tensor) or logits.dim() not in (3, 4):
        raise XAIConfigurationError(
            f"the causal LM returned {type(output).__name__}; the generation kernels need (N, L, vocab) logits "
            "(a tensor, a tuple with the logits first, or an output with .logits)."
        )
    # some heads (Llama 4, Medusa) return (N, heads, L, V): the first head is the model's next-token head
    return logits[:, 0] if logits.dim() == 4 else logits


def pack_prompts_and_targets(
    prompts: Sequence[Tensor], targets: Sequence[Tensor], pad_token_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + target`` rows for one teacher-forced forward pass.

    Returns:
        ``(ids, attention_mask, prompt_lengths)``: ``(R, L)`` token ids, ``(R, L)`` mask of real tokens and
        ``(R,)`` prompt lengths (row ``r``'s target starts at column ``prompt_lengths[r]``).

    Examples:
        >>> ids, mask, lengths = pack_prompts_and_targets([torch.tensor([1, 2]), torch.tensor([3])],
        ...                                               [torch.tensor([9]), torch.tensor([8, 7])])
        >>> ids.tolist(), mask.tolist(), lengths.tolist()
        ([[1, 2, 9], [3, 8, 7]], [[1, 1, 1], [1, 1, 1]], [2, 1])
    """
    if len(prompts) != len(targets):
        raise XAIConfigurationError(f"{len(prompts)} prompts but {len(targets)} targets; pass one target per prompt.")
    rows = [torch.cat([p.reshape(-1).long(), t.reshape(-1).long().to(p.device)]) for p, t in zip(prompts, targets)]
    if any(p.numel() == 0 for p in prompts):
        raise XAIConfigurationError(
            "a prompt has no tokens left; a causal LM needs at least one token to condition on."
        )
    width = max(row.numel() for row in rows)
    device = rows[0].device
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        ids[r, : row.numel()] = row
        mask[r, : row.numel()] = 1
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    return ids, mask, lengths


def target_token_log_probs(
    model: nn.Module,
    prompts: Sequence[Tensor],
    targets: Sequence[Tensor],
    batch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """``(R, T)`` log-probability of every target token given its prompt and the target tokens before it.

    ``T`` is the longest target; entries past a row's target are 0 (so a row's sum is ``log p(y | x)``).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(10, 10))  # logits at position i depend on token i only
        >>> lp = target_token_log_probs(model, [torch.tensor([3, 4])], [torch.tensor([5, 6])])
        >>> torch.allclose(lp[0, 0], model(torch.tensor([4])).log_softmax(-1)[0, 5])
        True
    """
    rows = len(prompts)
    width = max((t.numel() for t in targets), default=0)
    chunk = rows if batch_size is None else int(batch_size)
    if chunk < 1:
        raise XAIConfigurationError(f"batch_size must be a positive number of rows or None, got {batch_size}.")
    parts = []
    with torch.no_grad():
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            parts.append(_log_probs_of(model, prompts[part], targets[part], pad_token_id, width))
    return torch.cat(parts) if parts else torch.zeros(0, width)


def _log_probs_of(
    model: nn.Module, prompts: Sequence[Tensor], targets: Sequence[Tensor], pad_token_id: int, width: int
) -> Tensor:
    """:func:`target_token_log_probs` of one packed batch, differentiable (gradient methods call it directly)."""
    ids, mask, lengths = pack_prompts_and_targets(prompts, targets, pad_token_id)
    device = _device(model, ids)
    log_probs = causal_lm_logits(_call(model, ids.to(device), mask.to(device))).float().log_softmax(-1)
    sizes = torch.tensor([t.numel() for t in targets], device=device)
    columns = torch.arange(width, device=device)
    valid = columns < sizes[:, None]
    # row r's target token j is predicted at position prompt_length + j - 1
    positions = (lengths.to(device)[:, None] - 1 + columns).clamp(max=log_probs.shape[1] - 1)
    tokens = torch.zeros(len(targets), width, dtype=torch.long, device=device)
    for r, target in enumerate(targets):
        tokens[r, : target.numel()] = target.reshape(-1).to(device)
    rows = torch.arange(len(targets), device=device)[:, None]
    gathered = log_probs[rows, positions, tokens]
    return torch.where(valid, gathered, torch.zeros_like(gathered))


def _device(model: nn.Module, fallback: Tensor) -> torch.device:
    parameter = next(model.parameters(), None)
    return fallback.device if parameter is None else parameter.device


def _call(model: nn.Module, ids: Tensor, mask: Tensor) -> object:
    """Hugging Face models get the attention mask; a module whose forward takes no mask gets the ids alone
    (right padding leaves a causal model's real positions exact either way)."""
    if _takes_attention_mask(model):
        return model(input_ids=ids, attention_mask=mask)
    return model(ids)


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "attention_mask" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


# --------------------------------------------------------------------------------------- ranking and perturbing


def _check(prompts: Sequence[PromptFeatures], targets: Sequence[Tensor], attributions: Sequence[Tensor]) -> None:
    if not len(prompts) == len(targets) == len(attributions):
        raise XAIConfigurationError(
            f"{len(prompts)} prompts, {len(targets)} targets and {len(attributions)} attributions; pass one of each "
            "per prompt."
        )
    for i, (prompt, target, attribution) in enumerate(zip(prompts, targets, attributions)):
        if attribution.shape[-1] != prompt.num_features:
            raise XAIConfigurationError(
                f"prompt {i}: attributions of shape {tuple(attribution.shape)} for {prompt.num_features} features; "
                "the last dimension must have one score per prompt feature."
            )
        if attribution.dim() == 2 and attribution.shape[0] != target.numel():
            raise XAIConfigurationError(
                f"prompt {i}: per-token attributions of shape {tuple(attribution.shape)} for a target of "
                f"{target.numel()} tokens; give (target tokens, features)."
            )
        if target.numel() == 0:
            raise XAIConfigurationError(f"prompt {i} has an empty target; there is nothing to explain.")


@dataclass
class _Rows:
    """Perturbed prompts and, per row, which prompt, which step and (per-token) which output token it serves."""

    ids: list[Tensor]
    targets: list[Tensor]
    prompt: list[int]
    step: list[int]
    token: list[int]


def _perturbed_rows(
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    counts: Callable[[int], list[int]],
    keep_top: bool,
) -> _Rows:
    """Every prompt with its top ``counts(F)[s]`` features removed (``keep_top=False``) or alone kept.

    A 2-D ``(T, F)`` attribution ranks the features once per output token (the per-token variant); a 1-D one once.
    """
    rows = _Rows([], [], [], [], [])
    for i, (prompt, target, attribution) in enumerate(zip(prompts, targets, attributions)):
        ranks = _ranks(attribution.reshape(-1, prompt.num_features))
        for token, token_ranks in enumerate(ranks):
            for step, count in enumerate(counts(prompt.num_features)):
                top = token_ranks < count
                rows.ids.append(prompt.ids_without(top if keep_top else ~top))
                rows.targets.append(target)
                rows.prompt.append(i)
                rows.step.append(step)
                rows.token.append(token if ranks.shape[0] > 1 else -1)
    return rows


def _row_scores(
    model: nn.Module, rows: _Rows, batch_size: int | None, pad_token_id: int, score: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``score(token_log_probs, valid)`` of every perturbed row; per-token rows keep only their output token."""
    log_probs = target_token_log_probs(model, rows.ids, rows.targets, batch_size or DEFAULT_ROWS, pad_token_id)
    valid = torch.zeros_like(log_probs, dtype=torch.bool)
    for r, (target, token) in enumerate(zip(rows.targets, rows.token)):
        if token >= 0:
            valid[r, token] = True
        else:
            valid[r, : target.numel()] = True
    return score(log_probs, valid)


def _sequence_log_prob(log_probs: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, log_probs, torch.zeros_like(log_probs)).sum(-1)


def _mean_token_prob(log_probs: Tensor, valid: Tensor) -> Tensor:
    """Geometric mean of the target tokens' probabilities: in [0, 1] for targets of any length."""
    return (_sequence_log_prob(log_probs, valid) / valid.sum(-1).clamp_min(1)).exp()


def _mean_token_log_odds(log_probs: Tensor, valid: Tensor) -> Tensor:
    # log p - log(1 - p), with log1p(-exp) stable near p = 1; clamped so a certain token stays finite
    log_odds = log_probs - torch.log1p(-log_probs.clamp(max=-1e-7).exp())
    return torch.where(valid, log_odds, torch.zeros_like(log_odds)).sum(-1) / valid.sum(-1).clamp_min(1)


def _per_prompt(values: Tensor, rows: _Rows, num_prompts: int, steps: int) -> Tensor:
    """``(num_prompts, steps)``: the mean over a prompt's output tokens of its rows' values at each step."""
    sums = torch.zeros(num_prompts, steps, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    index = torch.tensor(rows.prompt, device=values.device) * steps + torch.tensor(rows.step, device=values.device)
    sums.view(-1).index_add_(0, index, values)
    counts.view(-1).index_add_(0, index, torch.ones_like(values))
    return sums / counts


def _fraction_difference(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    fractions: Sequence[float],
    keep_top: bool,
    batch_size: int | None,
    pad_token_id: int,
    score: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    _check(prompts, targets, attributions)
    if len(fractions) == 0:
        raise XAIConfigurationError("fractions is empty; give at least one fraction in [0, 1].")
    # the unperturbed prompts (step 0) and the perturbed ones (steps 1..) share the forward passes
    full = _perturbed_rows(prompts, targets, attributions, lambda f: [0], keep_top=False)
    perturbed = _perturbed_rows(
        prompts, targets, attributions, lambda f: [_top_count(float(q), f) for q in fractions], keep_top
    )
    rows = _Rows(
        full.ids + perturbed.ids,
        full.targets + perturbed.targets,
        full.prompt + perturbed.prompt,
        full.step + [step + 1 for step in perturbed.step],
        full.token + perturbed.token,
    )
    scores = _per_prompt(
        _row_scores(model, rows, batch_size, pad_token_id, score), rows, len(prompts), len(fractions) + 1
    )
    return (scores[:, :1] - scores[:, 1:]).mean(1)


def generation_comprehensiveness(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    fractions: Sequence[float] = (0.1, 0.2, 0.5),
    batch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Comprehensiveness (DeYoung et al. 2020) of a generation: ``log p(y | x) - log p(y | x without its top
    features)``, averaged over ``fractions`` (at least one feature each). Higher is better.

    With ``(F,)`` attributions (a whole target's), features are ranked once and the score is the target's
    log-probability. With ``(T, F)`` attributions (per output token), features are ranked for every output token
    ``t`` and the score is ``log p(y_t | x, y_<t)``, averaged over tokens: the per-token variant.

    Args:
        model: the causal LM.
        prompts: one :class:`PromptFeatures` per prompt.
        targets: ``(T_i,)`` target token ids per prompt.
        attributions: ``(F_i,)`` or ``(T_i, F_i)`` attributions per prompt.
        fractions: shares of each prompt's features removed.
        batch_size: perturbed rows per forward pass (64 by default).
        pad_token_id: the id padding uses (masked, so any valid id).

    Returns:
        ``(P,)`` comprehensiveness in nats per prompt.

    Examples:
        A "model" whose next-token logits copy the token before: only the last prompt token matters.

        >>> copy = nn.Sequential(nn.Embedding(8, 8))
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(10 * torch.eye(8))
        >>> prompt = PromptFeatures(torch.tensor([1, 2, 3]), baseline_id=0)
        >>> target = torch.tensor([3])
        >>> right = generation_comprehensiveness(copy, [prompt], [target], [torch.tensor([0.0, 0.0, 1.0])],
        ...                                      fractions=(0.34,))
        >>> wrong = generation_comprehensiveness(copy, [prompt], [target], [torch.tensor([1.0, 0.0, 0.0])],
        ...                                      fractions=(0.34,))
        >>> bool(right > 9), bool(wrong.abs() < 1e-6)
        (True, True)
    """
    return _fraction_difference(
        model, prompts, targets, attributions, fractions, False, batch_size, pad_token_id, _sequence_log_prob
    )


def generation_sufficiency(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    fractions: Sequence[float] = (0.1, 0.2, 0.5),
    batch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Sufficiency: ``log p(y | x) - log p(y | only the top features of x)``, averaged over ``fractions``; lower
    is better. Arguments and the per-token variant as in :func:`generation_comprehensiveness`.

    Examples:
        >>> copy = nn.Sequential(nn.Embedding(8, 8))
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(10 * torch.eye(8))
        >>> prompt = PromptFeatures(torch.tensor([1, 2, 3]), baseline_id=0)
        >>> value = generation_sufficiency(copy, [prompt], [torch.tensor([3])], [torch.tensor([0.0, 0.0, 1.0])],
        ...                                fractions=(0.34,))
        >>> bool(value.abs() < 1e-6)
        True
    """
    return _fraction_difference(
        model, prompts, targets, attributions, fractions, True, batch_size, pad_token_id, _sequence_log_prob
    )


def generation_log_odds(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    fractions: Sequence[float] = (0.1, 0.2, 0.5),
    batch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Log-odds change (Shrikumar et al. 2017; Chen et al. 2020) of the target tokens when the top features are
    removed: the mean over target tokens of ``logit p(y_t | x without its top features) - logit p(y_t | x)``,
    averaged over ``fractions``. More negative is better. Arguments as in :func:`generation_comprehensiveness`.

    Examples:
        >>> copy = nn.Sequential(nn.Embedding(8, 8))
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(10 * torch.eye(8))
        >>> prompt = PromptFeatures(torch.tensor([1, 2, 3]), baseline_id=0)
        >>> value = generation_log_odds(copy, [prompt], [torch.tensor([3])], [torch.tensor([0.0, 0.0, 1.0])],
        ...                             fractions=(0.34,))
        >>> bool(value < -15)
        True
    """
    return -_fraction_difference(
        model, prompts, targets, attributions, fractions, False, batch_size, pad_token_id, _mean_token_log_odds
    )


def _curve_area(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    steps: int,
    keep_top: bool,
    batch_size: int | None,
    pad_token_id: int,
) -> Tensor:
    _check(prompts, targets, attributions)
    if steps < 1:
        raise XAIConfigurationError(f"steps must be >= 1, got {steps}.")
    fractions = [s / steps for s in range(steps + 1)]
    rows = _perturbed_rows(prompts, targets, attributions, lambda f: [_top_count(q, f) for q in fractions], keep_top)
    curve = _per_prompt(
        _row_scores(model, rows, batch_size, pad_token_id, _mean_token_prob), rows, len(prompts), steps + 1
    )
    return torch.trapezoid(curve, dx=1.0 / steps, dim=1)


def generation_deletion_auc(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    steps: int = 10,
    batch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Area under the deletion curve (Petsiuk et al. 2018) of a generation: the target tokens' geometric-mean
    probability as the top ``0, 1/steps, ..., 1`` of the prompt's features are removed; lower is better.

    The geometric mean ``exp(log p(y | x) / T)`` keeps the curve in [0, 1] for targets of any length. Per-token
    attributions rank the features per output token (that token's probability then makes the curve).

    Examples:
        >>> copy = nn.Sequential(nn.Embedding(8, 8))
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(10 * torch.eye(8))
        >>> prompt = PromptFeatures(torch.tensor([1, 2, 3]), baseline_id=0)
        >>> right = generation_deletion_auc(copy, [prompt], [torch.tensor([3])], [torch.tensor([0.0, 0.0, 1.0])], 3)
        >>> wrong = generation_deletion_auc(copy, [prompt], [torch.tensor([3])], [torch.tensor([1.0, 1.0, 0.0])], 3)
        >>> bool(right < 0.2), bool(wrong > 0.8)
        (True, True)
    """
    return _curve_area(model, prompts, targets, attributions, steps, False, batch_size, pad_token_id)


def generation_insertion_auc(
    model: nn.Module,
    prompts: Sequence[PromptFeatures],
    targets: Sequence[Tensor],
    attributions: Sequence[Tensor],
    steps: int = 10,
    batch_size: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Area under the insertion curve: the target tokens' geometric-mean probability as only the top
    ``0, 1/steps, ..., 1`` of the prompt's features are kept (the rest removed); higher is better.

    Examples:
        >>> copy = nn.Sequential(nn.Embedding(8, 8))
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(10 * torch.eye(8))
        >>> prompt = PromptFeatures(torch.tensor([1, 2, 3]), baseline_id=0)
        >>> right = generation_insertion_auc(copy, [prompt], [torch.tensor([3])], [torch.tensor([0.0, 0.0, 1.0])], 3)
        >>> wrong = generation_insertion_auc(copy, [prompt], [torch.tensor([3])], [torch.tensor([1.0, 1.0, 0.0])], 3)
        >>> bool(right > 0.8), bool(wrong < 0.2)
        (True, True)
    """
    return _curve_area(model, prompts, targets, attributions, steps, True, batch_size, pad_token_id)


# ------------------------------------------------------------------------ the prompt's interpretable embedding space


class InterpolatedPrompts(nn.Module):
    """The targets' log-probabilities as a function of per-feature presence ``alpha`` in ``[0, 1]``.

    Feature ``j`` of prompt ``i`` enters the model as ``b + alpha_j (e - b)``: its token's embedding ``e`` at
    ``alpha_j = 1``, the baseline token's ``b`` at 0. ``alpha`` is Captum's interpretable input made continuous,
    so at ``alpha = 1`` an ablation of feature ``j`` (``alpha_j = 0``) is exactly its replacement by the baseline
    token, and Integrated Gradients from 0 to 1 in ``alpha`` is Layer Integrated Gradients at the embedding layer
    with the baseline token's embedding as the baseline. Infidelity and max-sensitivity perturb ``alpha``.

    Rows of ``alpha`` ``(R, F_max)`` are prompts ``r % P``. The prompts must replace removed tokens
    (``baseline_id`` set, no custom ``perturb``).

    Args:
        model: the causal LM; it must accept ``inputs_embeds`` (every Hugging Face causal LM does).
        embedding: its input embedding layer.
        prompts: the prompts.
        targets: their target ids.
    """

    def __init__(
        self, model: nn.Module, embedding: nn.Module, prompts: Sequence[PromptFeatures], targets: Sequence[Tensor]
    ) -> None:
        super().__init__()
        for i, prompt in enumerate(prompts):
            if prompt.baseline_id is None or prompt.perturb is not None:
                raise XAIConfigurationError(
                    f"prompt {i} drops or re-tokenizes removed features; metrics in the embedding space (infidelity, "
                    "max-sensitivity) need token features replaced by a baseline token."
                )
        self.model, self.embedding = model, embedding
        self.prompts, self.targets = list(prompts), [t.reshape(-1) for t in targets]
        self.num_features = max(p.num_features for p in self.prompts)

    def each(self) -> list[InterpolatedPrompts]:
        """One view per prompt (its own feature count, no padding)."""
        return [InterpolatedPrompts(self.model, self.embedding, [p], [t]) for p, t in zip(self.prompts, self.targets)]

    def ones(self) -> Tensor:
        """``(P, F_max)`` presence of every feature: the unperturbed prompts."""
        device = next(self.model.parameters()).device
        return torch.ones(len(self.prompts), self.num_features, device=device)

    def forward(self, alpha: Tensor) -> Tensor:
        n, rows = len(self.prompts), alpha.shape[0]
        width = max(p.ids.numel() + t.numel() for p, t in zip(self.prompts, self.targets))
        device = alpha.device
        embeds, mask, positions, tokens = [], torch.zeros(rows, width, dtype=torch.long, device=device), [], []
        for r in range(rows):
            prompt, target = self.prompts[r % n], self.targets[r % n].to(device)
            ids = prompt.ids.to(device)
            assert prompt.feature_ids is not None
            features = prompt.feature_ids.to(device)
            presence = torch.where(
                features >= 0, alpha[r].gather(0, features.clamp_min(0)), torch.ones_like(features, dtype=alpha.dtype)
            )
            token, base = self.embedding(ids), self.embedding(torch.full_like(ids, int(prompt.baseline_id)))
            sequence = torch.cat([base + presence[:, None] * (token - base), self.embedding(target)])
            embeds.append(torch.nn.functional.pad(sequence, (0, 0, 0, width - sequence.shape[0])))
            mask[r, : sequence.shape[0]] = 1
            positions.append(ids.numel() - 1 + torch.arange(target.numel(), device=device))
            tokens.append(target)
        logits = causal_lm_logits(self.model(inputs_embeds=torch.stack(embeds), attention_mask=mask))
        log_probs = logits.float().log_softmax(-1)
        return torch.stack([log_probs[r, positions[r], tokens[r]].sum() for r in range(rows)])


def generation_infidelity(
    scores: InterpolatedPrompts,
    attributions: Sequence[Tensor],
    n_perturb_samples: int = 10,
    removal_probability: float = 0.3,
    normalize: bool = True,
    seed: int | None = 0,
) -> Tensor:
    """Infidelity (Yeh et al. 2019) of sequence attributions in the prompt's interpretable embedding space.

    Perturbations remove a random subset of features (each with ``removal_probability``: Yeh's subset removal,
    the perturbation that matches ablation-style attributions) and the value is
    ``E[(I . a - (f(x) - f(x - I)))^2]`` with ``f`` the target's log-probability, computed by
    :func:`lightning_xai.functional.infidelity` one prompt at a time. ``normalize`` rescales the attributions by
    the least-squares factor first (scale-invariant; lower is better either way).

    Args:
        scores: the prompts' log-probability as a function of presence.
        attributions: ``(F_i,)`` per prompt.
        n_perturb_samples: perturbations per prompt.
        removal_probability: the chance of each feature to be removed in a perturbation.
        normalize: rescale the attributions first.
        seed: each prompt's perturbations come from a generator seeded with ``seed`` and the prompt's token ids, so
            its value does not depend on the other prompts of the call (DDP shares, order); None: torch's global
            generator.

    Returns:
        ``(P,)`` infidelity per prompt.

    Examples:
        A constructed LM whose logit for token 3 is the sum of the prompt's embeddings' first coordinate: each
        feature's ablation effect is a better attribution than the same values swapped between features.

        >>> class Additive(nn.Module):
        ...     def forward(self, inputs_embeds, attention_mask):
        ...         logits = torch.zeros(*inputs_embeds.shape[:2], 4)
        ...         logits[..., 3] = (inputs_embeds[..., 0] * attention_mask).cumsum(1)
        ...         return logits
        >>> embedding = nn.Embedding(4, 2)
        >>> with torch.no_grad():
        ...     _ = embedding.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [2, 0], [0, 0]]))
        >>> model = Additive()
        >>> model.register_parameter("p", nn.Parameter(torch.zeros(1)))
        >>> scores = InterpolatedPrompts(model, embedding, [PromptFeatures(torch.tensor([1, 2]), baseline_id=0)],
        ...                              [torch.tensor([3])])
        >>> exact = scores(scores.ones()) - scores(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        >>> def value(attribution):
        ...     return generation_infidelity(scores, [attribution])
        >>> bool(value(exact) < value(exact.flip(0)))
        True
    """
    from lightning_xai.functional.robustness import infidelity

    if not 0.0 < removal_probability < 1.0:
        raise XAIConfigurationError(f"removal_probability must lie in (0, 1), got {removal_probability}.")
    values = []
    for i, single in enumerate(scores.each()):
        inputs = single.ones()
        attribution = attributions[i].detach().reshape(1, -1).float().to(inputs.device)
        generator = _prompt_generator(single, seed)

        def perturb(x: Tensor, generator: torch.Generator | None = generator) -> tuple[Tensor, Tensor]:
            removed = (torch.rand(x.shape, generator=generator) < removal_probability).to(x.dtype).to(x.device)
            return removed, x - removed

        with torch.no_grad():
            values.append(infidelity(single, perturb, inputs, attribution, None, n_perturb_samples, normalize))
    return torch.cat(values)


def generation_sensitivity_max(
    scores: InterpolatedPrompts,
    explain_fn: Callable[[nn.Module, Tensor], Tensor],
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 10,
    seed: int | None = 0,
) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019) in the prompt's interpretable embedding space: the largest relative
    change of the explanation when every feature's presence is moved by at most ``perturb_radius`` (a small
    shift of each token embedding towards or away from its baseline), by
    :func:`lightning_xai.functional.sensitivity_max`.

    Args:
        scores: the prompts' log-probability as a function of presence.
        explain_fn: ``explain_fn(scores, alpha) -> (R, F)``: the method in that space (e.g. Captum's
            ``FeatureAblation(scores).attribute(alpha, baselines=0)`` or ``IntegratedGradients``), also at the
            unperturbed prompt, so that the comparison is within one method.
        perturb_radius: the largest change of each feature's presence.
        n_perturb_samples: perturbations per prompt.
        seed: as in :func:`generation_infidelity`.

    Returns:
        ``(P,)`` max-sensitivity per prompt (lower is better).
    """
    from lightning_xai.functional.robustness import sensitivity_max

    values = []
    for single in scores.each():
        generator = _prompt_generator(single, seed)
        values.append(
            sensitivity_max(
                lambda alpha, target, single=single: explain_fn(single, alpha),
                single.ones(),
                None,
                perturb_radius,
                n_perturb_samples,
                generator=generator,
                max_examples_per_batch=None,
            )
        )
    return torch.cat(values)


def _prompt_generator(single: InterpolatedPrompts, seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded by ``seed`` and the prompt's and target's token ids: a prompt meets the same
    perturbations whichever prompts share the call (a DDP rank's share, another order)."""
    if seed is None:
        return None
    ids = torch.cat([single.prompts[0].ids.cpu(), torch.tensor([-1]), single.targets[0].cpu()])
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(ids.numpy().tobytes()))


def _padded(attributions: Sequence[Tensor], scores: InterpolatedPrompts) -> Tensor:
    out = torch.zeros(len(attributions), scores.num_features)
    for i, attribution in enumerate(attributions):
        out[i, : attribution.numel()] = attribution.detach().reshape(-1).float().cpu()
    return out
