"""GenerationAttributionReport on a tiny GPT-2 inside a LightningModule: keys, stages, pictures, DDP, learning."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_xai.callbacks import GenerationAttributionReport
from lightning_xai.datasets import PlantedAssociation, word_tokenizer
from lightning_xai.errors import XAIConfigurationError
from tests.helpers import CausalLMBody, DictDataset, assert_ddp_matches_single, bind, tiny_gpt2, trainer

PROMPTS = ["today alice works as a", "in town bruno lives as a", "i heard greta works as a"]


def _module(package=pl, seed=0, extra_words=()):
    tokenizer = word_tokenizer([*PlantedAssociation.vocabulary(), *extra_words])
    return bind(CausalLMBody, package)(tiny_gpt2(tokenizer, seed=seed).train(), tokenizer)


def _data(n=32, seed=1):
    corpus = PlantedAssociation(num_sentences=n, seed=seed)
    return DictDataset(input_ids=corpus.input_ids, labels=corpus.input_ids)


class ModeProbe(pl.Callback):
    def __init__(self):
        self.training_modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.training_modes.append(pl_module.model.training)


def test_fit_logs_every_metric_per_method_and_restores_train_mode(lightning_package):
    metrics = [
        "comprehensiveness",
        "sufficiency",
        "log_odds",
        "deletion_auc",
        "insertion_auc",
        "infidelity",
        "sensitivity_max",
        "comprehensiveness_per_token",
        "randomization_sanity",
    ]
    report = GenerationAttributionReport(
        PROMPTS,
        methods=["feature_ablation", "layer_integrated_gradients"],
        metrics=metrics,
        max_new_tokens=3,
        pictures_every_n_epochs=0,
        method_kwargs={"layer_integrated_gradients": {"n_steps": 4}},
    )
    probe = ModeProbe()
    run = trainer(lightning_package, max_epochs=2, callbacks=[report, probe], limit_train_batches=2)
    module = _module(lightning_package)
    run.fit(module, DataLoader(_data(), batch_size=8), DataLoader(_data(), batch_size=16))
    for method in ("feature_ablation", "layer_integrated_gradients"):
        for metric in metrics:
            assert torch.isfinite(run.callback_metrics[f"llm/{method}/{metric}"]), (method, metric)
    agreement = float(run.callback_metrics["llm/agreement/feature_ablation_vs_layer_integrated_gradients"])
    assert -1.0 <= agreement <= 1.0
    assert all(probe.training_modes) and len(probe.training_modes) == 4  # train mode back after each report
    assert report.epochs_computed == 2
    assert all(1 <= len(r.output_tokens) <= 3 for r in report.results["feature_ablation"])  # EOS may end one
    # the report explains what the model generates: the same targets for every method
    fa, lig = report.results["feature_ablation"], report.results["layer_integrated_gradients"]
    assert [r.target_ids.tolist() for r in fa] == [r.target_ids.tolist() for r in lig]


def test_validate_and_test_log_their_own_keys_under_inference_mode(lightning_package):
    report = GenerationAttributionReport(
        PROMPTS, targets=["nurse", "pilot", None], methods=["layer_gradient_x_activation"], pictures_every_n_epochs=0
    )
    run = trainer(lightning_package, callbacks=[report])
    module = _module(lightning_package)
    run.validate(module, DataLoader(_data(), batch_size=16))
    assert "llm/layer_gradient_x_activation/comprehensiveness" in run.callback_metrics
    run.test(module, DataLoader(_data(), batch_size=16))
    assert "test/llm/layer_gradient_x_activation/comprehensiveness" in run.callback_metrics
    assert report.results["layer_gradient_x_activation"][0].output_tokens == ["nurse"]


def test_pictures_reach_the_logger_and_generated_text_is_escaped(tmp_path):
    module = _module(extra_words=("<script>",))
    report = GenerationAttributionReport(
        ["today alice works as a"],
        targets=["<script> ."],
        metrics=[],
        methods=["feature_ablation", "kernel_shap"],
        method_kwargs={"kernel_shap": {"n_samples": 16}},
    )
    run = trainer(max_epochs=1, callbacks=[report], logger=CSVLogger(tmp_path, name="llm"), limit_train_batches=1)
    run.fit(module, DataLoader(_data(), batch_size=8), DataLoader(_data(), batch_size=16))
    pngs = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert any("feature_ablation" in p and "heatmap" in p for p in pngs) and any("kernel_shap" in p for p in pngs)
    html = next(p for p in tmp_path.rglob("*.html") if "feature_ablation" in str(p)).read_text()
    assert "&lt;script&gt;" in html and "<script>" not in html.replace("&lt;script&gt;", "")
    tables = [p for p in tmp_path.rglob("*.csv") if "top_features" in str(p)]
    assert tables and "alice" in tables[0].read_text()


def test_state_survives_a_checkpoint(tmp_path):
    report = GenerationAttributionReport(PROMPTS[:1], targets=["nurse"], pictures_every_n_epochs=0)
    run = trainer(
        max_epochs=1, callbacks=[report], limit_train_batches=1, default_root_dir=tmp_path, enable_checkpointing=True
    )
    run.fit(_module(), DataLoader(_data(), batch_size=8), DataLoader(_data(), batch_size=16))
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    state = checkpoint["callbacks"][report.state_key]
    assert state["epochs_computed"] == 1 and "feature_ablation/comprehensiveness" in state["last_values"]


def test_configuration_errors_are_early_and_named():
    with pytest.raises(XAIConfigurationError, match="at least one prompt"):
        GenerationAttributionReport([])
    with pytest.raises(XAIConfigurationError, match="unknown metrics"):
        GenerationAttributionReport(PROMPTS, metrics=["accuracy"])
    with pytest.raises(XAIConfigurationError, match="per-output-token"):
        GenerationAttributionReport(PROMPTS, methods=["lime"], metrics=["sufficiency_per_token"])
    with pytest.raises(XAIConfigurationError, match="one target"):
        GenerationAttributionReport(PROMPTS, targets=["nurse"])
    segments = [{"template": "{} works as a", "values": ["alice"]}]
    report = GenerationAttributionReport(segments, methods=["layer_integrated_gradients"])
    with pytest.raises(XAIConfigurationError, match="token prompts"):
        trainer(callbacks=[report], max_epochs=1).fit(_module(), DataLoader(_data(), batch_size=8))
    report = GenerationAttributionReport(PROMPTS, model_attribute="lm")
    with pytest.raises(XAIConfigurationError, match="model_attribute="):
        trainer(callbacks=[report], max_epochs=1).fit(_module(), DataLoader(_data(), batch_size=8))


def test_segments_with_removal_run_inside_training():
    segments = [{"template": "{} {} works as a", "values": ["today", "alice"], "target": "nurse"}]
    report = GenerationAttributionReport(
        segments, metrics=["comprehensiveness", "deletion_auc"], pictures_every_n_epochs=0
    )
    run = trainer(max_epochs=1, callbacks=[report], limit_train_batches=1)
    run.fit(_module(), DataLoader(_data(), batch_size=8), DataLoader(_data(), batch_size=16))
    assert report.results["feature_ablation"][0].features == ["today", "alice"]
    assert torch.isfinite(run.callback_metrics["llm/feature_ablation/deletion_auc"])


def test_the_report_finds_the_planted_association_as_it_is_learnt():
    """The name's attribution to the occupation rises to log 8 as a GPT-2 trained from scratch learns alice -> nurse
    (one of eight occupations becomes certain), and a control name's stays near -log 8 / 11."""
    corpus = PlantedAssociation(num_sentences=1200, seed=0)
    module = bind(CausalLMBody)(tiny_gpt2(corpus.tokenizer, seed=0).train(), corpus.tokenizer, lr=5e-3)
    planted, control = corpus.probe_segments()[:3], corpus.probe_segments("bruno")[:3]
    report = GenerationAttributionReport(planted + control, metrics=[], num_trials=4, pictures_every_n_epochs=0)

    class NameAttribution(pl.Callback):
        history: list = []

        def on_validation_epoch_end(self, trainer, pl_module):
            names = [float(r.seq_attr[1]) for r in report.results["feature_ablation"]]
            self.history.append((sum(names[:3]) / 3, sum(names[3:]) / 3))

    watch = NameAttribution()
    torch.manual_seed(0)
    run = trainer(max_epochs=4, callbacks=[report, watch], limit_val_batches=1)
    val = PlantedAssociation(num_sentences=32, seed=1)
    run.fit(module, DataLoader(corpus, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    (first, _), (last, last_control) = watch.history[0], watch.history[-1]
    assert len(watch.history) == 4
    assert first < 0.8 and last > 1.5 and last > first + 1.0
    assert -0.6 < last_control < 0.1


@pytest.mark.ddp
def test_ddp_splits_prompts_and_equals_one_process():
    results = assert_ddp_matches_single(
        _module,
        lambda: [
            GenerationAttributionReport(
                PROMPTS,
                targets=["nurse", None, "pilot ."],
                pictures_every_n_epochs=0,
                metrics=["comprehensiveness", "insertion_auc", "infidelity"],
                methods=["feature_ablation", "layer_integrated_gradients"],
                method_kwargs={"layer_integrated_gradients": {"n_steps": 4}},
            )
        ],
        _data(16),
        batch_size=16,
        stage="validate",
        prefixes=("llm/",),
        parameters=False,
    )
    assert len(results[2]["values"]) == 7


@pytest.mark.ddp
def test_ddp_gathers_segment_prompts_and_equals_one_process():
    segments = [
        {"template": "{} {} works as a", "values": ["today", name], "baselines": ["in town", "liam"], "target": "nurse"}
        for name in ("alice", "bruno", "greta")
    ]
    results = assert_ddp_matches_single(
        _module,
        lambda: [GenerationAttributionReport(segments, metrics=["comprehensiveness", "deletion_auc"])],
        _data(16),
        batch_size=16,
        stage="validate",
        prefixes=("llm/",),
        parameters=False,
    )
    assert len(results[2]["values"]) == 2
