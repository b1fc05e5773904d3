"""GenerationAttributionReport: attribution of a causal LM's generations, with faithfulness metrics, every epoch."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import override

from lightning_xai._contract import eval_mode
from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai.attribution.generation import (
    EMBEDDING_SPACE_METHODS,
    GENERATION_METHODS,
    GenerationAttribution,
    as_interpretable_input,
    attribute_generation,
    replaces_tokens,
    resolve_targets,
)
from lightning_xai.callbacks._base import EpochMetricCallback, Stage
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.metrics.attribution_agreement import AttributionAgreement
from lightning_xai.metrics.generation_faithfulness import KERNELS, GenerationFaithfulness
from lightning_xai.metrics.randomization_sanity import RandomizationSanity

#: metrics the report computes besides the faithfulness kernels
SANITY_METRIC = "randomization_sanity"
# comprehensiveness alone by default, as AttributionMetrics: the report then stays near 10 % of an epoch of the
# example (benchmarks/generation_report_cost.py); each further metric costs one more batched forward pass
DEFAULT_METRICS = ("comprehensiveness",)


class GenerationAttributionReport(EpochMetricCallback):
    """Attributes a causal LM's generations to their prompts every ``every_n_epochs`` validation epochs and at
    ``test``, and logs faithfulness metrics, token-by-token heatmaps and a table of top features.

    For every prompt the model (``pl_module.<model_attribute>``, a Hugging Face causal LM) generates greedily up
    to ``max_new_tokens`` tokens (or explains the given target), and each method of ``methods`` attributes the
    output's log-probability to the prompt's tokens or segments through Captum
    (:func:`lightning_xai.attribution.generation.attribute_generation`). Logged per method:

    * ``llm/<method>/<metric>`` for every metric of ``metrics``: the faithfulness kernels of
      :class:`~lightning_xai.metrics.GenerationFaithfulness` (``comprehensiveness``, ``sufficiency``, ``log_odds``,
      ``deletion_auc``, ``insertion_auc``, ``infidelity``, ``sensitivity_max``; ``<metric>_per_token`` for the
      per-output-token variant) and ``randomization_sanity`` (rank correlation with the attributions of a copy whose
      top layer is re-initialised: lower means the explanation depends on the weights);
    * ``llm/agreement/<a>_vs_<b>``: the rank correlation between every two methods, per prompt, averaged;
    * pictures on their cadence: ``llm/<method>/heatmap`` (PNG: output tokens x prompt features per prompt),
      ``llm/<method>/tokens`` (the same as escaped HTML) and ``llm/<method>/top_features`` (a table of prompt,
      generation and top features), through every supported logger.

    The model runs in eval mode and gets its train/eval modes back afterwards; gradients are enabled inside
    validation and ``validate()``. Under DDP the prompts are split across ranks, metric states are summed over
    ranks (exact), and rank 0 logs the pictures of all prompts. :attr:`results` holds the last attributions
    of every prompt per method.

    Cost: the default (FeatureAblation, comprehensiveness, up to 8 new tokens, pictures every 10 computations)
    runs ``F_max + 1`` batched forward passes of all prompts for the attribution, one for the metric and one per
    generated token; ``benchmarks/generation_report_cost.py`` measures it at about 10 % of an epoch of fine-tuning
    the example's tiny GPT-2 (2000 sentences) for 6 prompts. A picture costs about 0.1-0.3 s to render.

    Args:
        prompts: text (token features), or mappings ``{"template": "{} works as a", "values": ["alice"],
            "baselines": ["someone"], "target": "nurse"}`` (segment features, Captum's ``TextTemplateInput``).
        targets: one target per prompt (None: the greedy generation); a mapping's ``"target"`` wins.
        methods: names of :data:`~lightning_xai.attribution.generation.GENERATION_METHODS`.
        metrics: metric names (see above); comprehensiveness by default; ``[]`` for attributions and pictures
            only.
        max_new_tokens: the bound of greedy generation.
        baseline: what removed prompt tokens become: None (the tokenizer's pad / UNK / EOS token), a token or an
            id, or ``"remove"``.
        model_attribute: the attribute of the LightningModule that holds the causal LM (``""``: the module).
        tokenizer: the tokenizer; None reads ``pl_module.<tokenizer_attribute>``.
        tokenizer_attribute: where to find the tokenizer on the module.
        method_kwargs: per-method options of the Captum method, ``{"layer_integrated_gradients": {"n_steps": 16}}``.
        metric_kwargs: per-metric kernel options, ``{"comprehensiveness": {"fractions": [0.2]}}``.
        every_n_epochs: compute every this many validation epochs.
        pictures_every_n_epochs: log pictures on the first computation and every this many after; 0 never.
        num_pictures: prompts shown in the pictures.
        num_trials: perturbation methods average this many runs (sampled replacement values, Shapley sampling).
        seed: seeds Python's ``random`` (Captum's ``ProductBaselines``) and torch for each report, so every epoch
            draws the same samples; the user's random state is restored afterwards.
        name: the callback's name; with it, keys are ``llm/<name>/<method>/<metric>``.

    Examples:
        >>> report = GenerationAttributionReport(["today alice works as a"], methods=["feature_ablation"])
        >>> report.state_key
        "GenerationAttributionReport{'name': 'generationattributionreport'}"
    """

    def __init__(
        self,
        prompts: list[str | dict[str, Any]],
        targets: list[str | None] | None = None,
        methods: list[str] | None = None,
        metrics: list[str] | None = None,
        max_new_tokens: int = 8,
        baseline: int | str | None = None,
        model_attribute: str = "model",
        tokenizer: Any = None,
        tokenizer_attribute: str = "tokenizer",
        method_kwargs: dict[str, dict[str, Any]] | None = None,
        metric_kwargs: dict[str, dict[str, Any]] | None = None,
        every_n_epochs: int = 1,
        pictures_every_n_epochs: int = 10,
        num_pictures: int = 4,
        num_trials: int = 1,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, every_n_epochs=every_n_epochs, pictures_every_n_epochs=pictures_every_n_epochs)
        where = "GenerationAttributionReport"
        if not prompts:
            raise XAIConfigurationError(f"{where}: give at least one prompt.")
        if targets is not None and len(targets) != len(prompts):
            raise XAIConfigurationError(
                f"{where}: {len(prompts)} prompts but {len(targets)} targets; give one target (or None) per prompt."
            )
        self.methods = list(methods or ["feature_ablation"])
        unknown = [m for m in self.methods if m not in GENERATION_METHODS]
        if unknown or len(set(self.methods)) != len(self.methods):
            raise XAIConfigurationError(
                f"{where}: methods {self.methods} must be distinct names of {sorted(GENERATION_METHODS)}."
            )
        self.metrics = list(DEFAULT_METRICS if metrics is None else metrics)
        known = {*KERNELS, *(f"{k}_per_token" for k in KERNELS if not KERNELS[k].embedding_space), SANITY_METRIC}
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            raise XAIConfigurationError(f"{where}: unknown metrics {unknown}; choose from {sorted(known)}.")
        per_token = [m for m in self.metrics if m.endswith("_per_token")]
        whole_only = [m for m in self.methods if not GENERATION_METHODS[m].per_token]
        if per_token and whole_only:
            raise XAIConfigurationError(
                f"{where}: {per_token} need per-output-token attributions, which {whole_only} do not give; use "
                "feature_ablation, shapley_value_sampling or a gradient method for them."
            )
        if max_new_tokens < 1 or num_pictures < 1:
            raise XAIConfigurationError(f"{where}: max_new_tokens and num_pictures must be >= 1.")
        self.prompts = list(prompts)
        self.targets = list(targets) if targets is not None else [None] * len(prompts)
        self.max_new_tokens = int(max_new_tokens)
        self.baseline = baseline
        self.model_attribute = model_attribute
        self.tokenizer = tokenizer
        self.tokenizer_attribute = tokenizer_attribute
        self.method_kwargs = {k: dict(v) for k, v in (method_kwargs or {}).items()}
        self.metric_kwargs = {k: dict(v) for k, v in (metric_kwargs or {}).items()}
        self.num_pictures = int(num_pictures)
        self.num_trials = int(num_trials)
        self.seed = int(seed)
        #: method -> the last attributions of every prompt (all ranks' prompts, in prompt order)
        self.results: dict[str, list[GenerationAttribution]] = {}

    @property
    def log_prefix(self) -> str:
        return "llm" if self._name is None else f"llm/{self._name}"

    @property
    def _attribute_name(self) -> str:
        return "xai_generation_report_" + "".join(c if c.isalnum() else "_" for c in self.name)

    # ------------------------------------------------------------------------------------- setup

    def _language_model(self, pl_module: LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attribute, None) if self.model_attribute else pl_module
        if not isinstance(model, nn.Module):
            raise XAIConfigurationError(
                f"{self.where} attributes the causal LM at pl_module.{self.model_attribute}, and "
                f"{type(pl_module).__name__} has no module there; set model_attribute= to the attribute that holds "
                "it ('' for the LightningModule itself)."
            )
        return model

    def _tokenizer(self, pl_module: LightningModule) -> Any:
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, self.tokenizer_attribute, None)
        if tokenizer is None:
            raise XAIConfigurationError(
                f"{self.where} needs the model's tokenizer: pass tokenizer= or set "
                f"pl_module.{self.tokenizer_attribute}."
            )
        return tokenizer

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        model, tokenizer = self._language_model(pl_module), self._tokenizer(pl_module)
        gradient = [m for m in self.methods if not GENERATION_METHODS[m].perturbation]
        embedding_metrics = [m for m in self.metrics if m in KERNELS and KERNELS[m].embedding_space]
        if gradient or embedding_metrics:
            if not callable(getattr(model, "get_input_embeddings", None)):
                raise XAIConfigurationError(
                    f"{self.where}: {gradient + embedding_metrics} work at the input embeddings, and "
                    f"{type(model).__name__} has no get_input_embeddings(); use perturbation methods and metrics."
                )
            for prompt in self.prompts:  # fails here, not after an epoch of training, on segments or removal
                if not replaces_tokens(as_interpretable_input(prompt, tokenizer, self.baseline)):
                    raise XAIConfigurationError(
                        f"{self.where}: {gradient + embedding_metrics} need token prompts whose removed tokens are "
                        f"replaced; prompt {prompt!r} with baseline={self.baseline!r} is not. Use perturbation "
                        "methods and prompt-space metrics for segments or removal."
                    )
        if not hasattr(pl_module, self._attribute_name):
            metrics = nn.ModuleDict()
            for method in self.methods:
                per_method = nn.ModuleDict()
                for metric in self.metrics:
                    if metric == SANITY_METRIC:
                        options = {"cascading": False, "num_layers": 1, **self.metric_kwargs.get(metric, {})}
                        per_method[metric] = RandomizationSanity(**options)
                    else:
                        kernel = metric.removesuffix("_per_token")
                        per_method[metric] = GenerationFaithfulness(kernel, **self.metric_kwargs.get(metric, {}))
                metrics[method] = per_method
            for first, second in self._pairs():
                metrics[f"agreement_{first}_vs_{second}"] = AttributionAgreement()
            # A logged Metric must be an attribute of the LightningModule (device moves, DDP sync).
            pl_module.add_module(self._attribute_name, metrics)

    def _pairs(self) -> list[tuple[str, str]]:
        return [(a, b) for i, a in enumerate(self.methods) for b in self.methods[i + 1 :]]

    # ------------------------------------------------------------------------------------- computing

    @override
    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        model, tokenizer = self._language_model(pl_module), self._tokenizer(pl_module)
        metrics: nn.ModuleDict = getattr(pl_module, self._attribute_name)
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(self.prompts), world))
        local: dict[str, list[GenerationAttribution]] = {}
        python_state = random.getstate()
        try:
            with eval_mode(model), torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
                random.seed(self.seed)
                torch.manual_seed(self.seed)
                # generated once: every method explains the same output
                targets = self._targets(model, tokenizer, mine)
                for method in self.methods:
                    local[method] = self._attribute(model, tokenizer, method, mine, targets)
                    self._update(model, tokenizer, metrics[method], method, local[method], mine)
                for first, second in self._pairs():
                    metrics[f"agreement_{first}_vs_{second}"].update(
                        [r.seq_attr for r in local[first]], [r.seq_attr for r in local[second]]
                    )
                values = {}
                for key, metric in metrics.items():  # collective under DDP: every rank computes, in one order
                    if isinstance(metric, nn.ModuleDict):
                        for metric_name, method_metric in metric.items():
                            values[f"{key}/{metric_name}"] = method_metric.compute()
                            method_metric.reset()
                    else:
                        values[key.replace("agreement_", "agreement/", 1)] = metric.compute()
                        metric.reset()
        finally:
            random.setstate(python_state)
        self.results = self._gathered(local, mine)
        self.log_values(pl_module, values, stage)
        if self.pictures_due(trainer, stage):
            self.log_pictures(trainer, self._log_pictures, stage)

    def _targets(self, model: nn.Module, tokenizer: Any, indices: list[int]) -> list[Any]:
        if not indices:
            return []
        prompts = [self.prompts[i] for i in indices]
        given = [self.targets[i] for i in indices]
        return resolve_targets(model, tokenizer, prompts, given, self.max_new_tokens, self.baseline)

    def _attribute(
        self, model: nn.Module, tokenizer: Any, method: str, indices: list[int], targets: list[Any]
    ) -> list[GenerationAttribution]:
        if not indices:
            return []
        return attribute_generation(
            model,
            tokenizer,
            [self._without_target(self.prompts[i]) for i in indices],
            targets,
            method=method,
            baseline=self.baseline,
            max_new_tokens=self.max_new_tokens,
            method_kwargs=self.method_kwargs.get(method),
            num_trials=self.num_trials,
        )

    def _update(
        self,
        model: nn.Module,
        tokenizer: Any,
        metrics: nn.ModuleDict,
        method: str,
        results: list[GenerationAttribution],
        indices: list[int],
    ) -> None:
        if not results:
            return
        prompts = [r.prompt_features for r in results]
        targets = [r.target_ids.to(next(model.parameters()).device) for r in results]
        embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
        for metric_name, metric in metrics.items():
            if metric_name == SANITY_METRIC:
                self._sanity(model, tokenizer, metric, method, results, indices)
                continue
            per_token = metric_name.endswith("_per_token")
            attributions = [r.token_attr if per_token else r.seq_attr for r in results]
            explain = EMBEDDING_SPACE_METHODS[method]
            options = self.method_kwargs.get(method, {})
            metric.update(
                model,
                prompts,
                targets,
                attributions,
                embedding=embedding,
                explain_fn=lambda scores, alpha, explain=explain, options=options: explain(scores, alpha, **options),
            )

    def _sanity(
        self,
        model: nn.Module,
        tokenizer: Any,
        metric: RandomizationSanity,
        method: str,
        results: list[GenerationAttribution],
        indices: list[int],
    ) -> None:
        for index, result in zip(indices, results):
            placeholder = torch.zeros(1, result.seq_attr.numel())
            target = torch.zeros(1, dtype=torch.long)

            def explain(
                copy: nn.Module, inputs: Any, label: Any, index: int = index, target_ids: Any = result.target_ids
            ) -> Any:
                # the randomized copy explains the original model's output, not its own generation
                again = attribute_generation(
                    copy,
                    tokenizer,
                    [self._without_target(self.prompts[index])],
                    [target_ids],
                    method=method,
                    baseline=self.baseline,
                    method_kwargs=self.method_kwargs.get(method),
                )
                return again[0].seq_attr[None]

            metric.update(placeholder, result.seq_attr[None], target, model=model, explain_fn=explain)

    def _gathered(self, local: dict[str, list[GenerationAttribution]], mine: list[int]) -> dict[str, list]:
        """Every prompt's results on every rank, in prompt order (one collective, made by all ranks)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (mine, local))
        merged: dict[str, list] = {method: [None] * len(self.prompts) for method in self.methods}
        for indices, results in shares:
            for method, rows in results.items():
                for i, row in zip(indices, rows):
                    merged[method][i] = row
        return merged

    # ------------------------------------------------------------------------------------- pictures

    def _log_pictures(self, trainer: Trainer, stage: Stage) -> None:
        from lightning_xai import loggers, visualization

        step = trainer.global_step
        for method, results in self.results.items():
            shown = results[: self.num_pictures]
            features = [r.features for r in shown]
            outputs = [r.output_tokens if r.token_attr is not None else ["(whole output)"] for r in shown]
            grids = [(r.token_attr if r.token_attr is not None else r.seq_attr[None]).tolist() for r in shown]
            titles = [f"{r.prompt!r} -> {''.join(_spaced(r.output_tokens))!r}" for r in shown]
            image = visualization.render_generation_heatmaps(features, outputs, grids, titles, self.num_pictures)
            loggers.log_image(trainer, self.key(f"{method}/heatmap", stage), image, step=step)
            html = visualization.generation_attribution_html(features, outputs, grids, titles)
            loggers.log_html(trainer, self.key(f"{method}/tokens", stage), html, step=step)
            rows = [
                [
                    r.prompt,
                    "".join(_spaced(r.output_tokens)),
                    ", ".join(f"{feature} ({value:+.3f})" for feature, value in r.top_features(3)),
                ]
                for r in results
            ]
            loggers.log_table(
                trainer, self.key(f"{method}/top_features", stage), ["prompt", "generation", "top features"], rows, step
            )

    @staticmethod
    def _without_target(prompt: str | dict[str, Any]) -> str | dict[str, Any]:
        # the resolved target ids replace a mapping's own "target" (already encoded)
        return {k: v for k, v in prompt.items() if k != "target"} if isinstance(prompt, dict) else prompt


def _spaced(tokens: list[str]) -> list[str]:
    return [t if t.startswith((" ", "\u0120")) or i == 0 else f" {t}" for i, t in enumerate(tokens)]
