"""RevisionFreeze: the frozen part of a model stays bit-identical through fit (weights, weight decay, BatchNorm
statistics, resumes, DDP), the rest trains, and the model leaves fit with its requires_grad and modes as before."""

from __future__ import annotations

import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.callbacks.revision_freeze import RevisionFreeze
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import rrr_penalty
from tests.helpers import DictDataset, MLPBody, bind, decoy_tabular, loader, trainer


class NormCNNBody(XAIMixin):
    """A CNN with BatchNorm, trained by AdamW with weight decay; it records the BN modes its steps ran in."""

    def __init__(self, weight_decay: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(32, 3)
        self.weight_decay = weight_decay
        self.step_modes: list[tuple[bool, bool]] = []

    def forward(self, x):
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        self.step_modes.append((self.features[1].training, self.features[5].training))
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def on_validation_model_train(self):
        # the pre-2.2 behaviour of Lightning: everything back to training mode after validation
        self.train()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=self.weight_decay)


def _images(n: int = 32, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DictDataset(input=x, target=y, mask=torch.zeros(n, 1, 8, 8))


def _trained_cnn(package, seed: int = 0):
    """A CNN whose BatchNorm layers hold statistics of earlier training (not their initial zeros and ones)."""
    torch.manual_seed(seed)
    model = bind(NormCNNBody, package)()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8) * 3 + 1)
    return model


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _assert_identical(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def _assert_all_changed(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    for key, value in before.items():
        assert not torch.equal(after[key], value), f"{key} did not train"


# ----------------------------------------------------------------------------------- fit


def test_only_the_trainable_head_changes_and_batch_norm_statistics_stay_bit_identical(lightning_package):
    model = _trained_cnn(lightning_package)
    features, head = _snapshot(model.features), _snapshot(model.head)
    freeze = RevisionFreeze(trainable="head")
    run = trainer(
        lightning_package, max_epochs=2, callbacks=[freeze], val_check_interval=0.5, limit_val_batches=1
    )  # validation twice per epoch, each ending in model.train()
    run.fit(model, loader(_images(), 8), loader(_images(8, seed=1), 8))

    assert run.global_step == 8
    _assert_identical(features, model.features)  # weights under AdamW weight decay 0.1, running_mean/var, counts
    _assert_all_changed(head, model.head)
    # every training step ran with the frozen BatchNorms in eval mode, also right after each validation
    assert model.step_modes == [(False, False)] * 8
    # the model leaves fit as it came: everything requires grad, the BatchNorms are back in training mode
    assert all(p.requires_grad for p in model.parameters())
    assert model.features[1].training and model.features[5].training
    assert freeze.trainable_parameter_count == 32 * 3 + 3
    assert freeze.frozen_parameter_count == sum(p.numel() for p in model.features.parameters())
    assert freeze.eval_norm_names == ["features.1", "features.5"]


def test_without_norm_eval_the_running_statistics_follow_the_data_but_the_weights_stay():
    model = _trained_cnn(pl)
    features = _snapshot(model.features)
    freeze = RevisionFreeze(frozen="features", norm_eval=False)
    trainer(max_epochs=1, callbacks=[freeze]).fit(model, loader(_images(), 8))
    assert freeze.eval_norm_names == []
    after = model.features.state_dict()
    assert not torch.equal(after["1.running_mean"], features["1.running_mean"])  # the control: stats do move
    assert int(after["1.num_batches_tracked"]) == int(features["1.num_batches_tracked"]) + 4
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "5.weight"):
        assert torch.equal(after[key], features[key]), key
    assert model.step_modes == [(True, True)] * 4


def test_the_same_model_without_the_callback_changes_everything_under_weight_decay():
    # the control of the first test: AdamW with weight decay moves every weight that has a gradient
    model = _trained_cnn(pl)
    features = _snapshot(model.features)
    trainer(max_epochs=1).fit(model, loader(_images(), 8))
    for key in ("0.weight", "1.weight", "1.running_mean", "4.weight", "5.running_var"):
        assert not torch.equal(model.features.state_dict()[key], features[key]), key


def test_frozen_and_freeze_until_select_the_same_parameters_as_trainable():
    model = _trained_cnn(pl)
    selections = {}
    for freeze in (
        RevisionFreeze(trainable="head"),
        RevisionFreeze(trainable=["head"]),
        RevisionFreeze(frozen="features"),
        RevisionFreeze(freeze_until="features"),
        RevisionFreeze(freeze_until="features.7"),  # the last module before the head
    ):
        freeze.setup(None, model, "fit")
        selections[freeze._describe()] = (freeze.frozen_parameter_names, freeze.eval_norm_names)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
        freeze.teardown(None, model, "fit")
        assert all(p.requires_grad for p in model.parameters())
    expected = (
        [f"features.{i}.{kind}" for i in (0, 1, 4, 5) for kind in ("weight", "bias")],
        ["features.1", "features.5"],
    )
    assert all(selection == expected for selection in selections.values()), selections


def test_freeze_until_includes_the_named_module_and_everything_before_it():
    model = _trained_cnn(pl)
    freeze = RevisionFreeze(freeze_until="features.4")  # the second convolution; its BatchNorm trains on
    freeze.setup(None, model, "fit")
    assert freeze.frozen_parameter_names == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.4.weight", "features.4.bias",
    ]  # fmt: skip
    assert freeze.eval_norm_names == ["features.1"]
    assert freeze.trainable_parameter_count == 8 + 8 + 32 * 3 + 3
    freeze.teardown(None, model, "fit")


def test_parameters_frozen_before_fit_stay_frozen_and_stale_gradients_are_dropped():
    model = _trained_cnn(pl)
    model.head.bias.requires_grad_(False)  # the user's own choice
    for parameter in model.features.parameters():
        parameter.grad = torch.ones_like(parameter)
    freeze = RevisionFreeze(frozen=["features.0", "features.1"])
    freeze.setup(None, model, "fit")
    assert model.features[0].weight.grad is None and model.features[1].bias.grad is None
    assert freeze.frozen_parameter_names == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
    ]
    assert freeze.trainable_parameter_count == 4 * 8 * 9 + 8 + 8 + 8 + 32 * 3  # features.4, features.5, head.weight
    freeze.teardown(None, model, "fit")
    assert not model.head.bias.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "head.bias")


def test_a_shared_parameter_trains_with_trainable_and_is_frozen_with_frozen():
    first = nn.Linear(3, 3)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2))
    model[2].weight = first.weight  # tied
    freeze = RevisionFreeze(trainable="2")
    freeze.setup(None, model, "fit")
    assert first.weight.requires_grad and not first.bias.requires_grad
    freeze.teardown(None, model, "fit")
    freeze = RevisionFreeze(frozen="2")
    freeze.setup(None, model, "fit")
    assert not first.weight.requires_grad and first.bias.requires_grad
    freeze.teardown(None, model, "fit")
    assert all(p.requires_grad for p in model.parameters())


def test_a_failing_fit_leaves_the_model_as_it_was(lightning_package):
    class Failing(bind(NormCNNBody, lightning_package)):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(lightning_package, max_epochs=1, callbacks=[RevisionFreeze(trainable="head")]).fit(
            model, loader(_images(), 8)
        )
    assert all(p.requires_grad for p in model.parameters())
    assert model.features[1].training and model.features[5].training


@pytest.mark.filterwarnings("ignore:rrr. the weighted term")  # the model fits the decoy: its task loss is tiny
def test_with_an_rrr_penalty_only_the_head_changes_and_the_penalty_decreases(lightning_package):
    x, y, mask = decoy_tabular(256)
    data = loader(DictDataset(input=x, target=y, mask=mask), 32, shuffle=True)
    torch.manual_seed(0)
    model = bind(MLPBody, lightning_package)(lr=0.05)
    trainer(lightning_package, max_epochs=3).fit(model, data)  # learns the decoy (feature 1)
    model.eval()
    penalty_before = rrr_penalty(model, x, mask).item()
    model.train()
    body, head = _snapshot(model.net[0]), _snapshot(model.net[2])

    freeze = RevisionFreeze(trainable="net.2")
    revision = trainer(
        lightning_package, max_epochs=3, callbacks=[freeze, ExplanationPenalty(method="rrr", weight=10.0)]
    )
    revision.fit(model, data)

    _assert_identical(body, model.net[0])
    _assert_all_changed(head, model.net[2])
    model.eval()
    penalty_after = rrr_penalty(model, x, mask).item()
    assert penalty_after < 0.1 * penalty_before  # measured: 17.9 -> 0.54, (penalty_before, penalty_after)
    assert freeze.trainable_parameter_count == 16 * 2 + 2


# ----------------------------------------------------------------------------------- checkpoints


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
def test_resuming_from_a_checkpoint_keeps_the_frozen_part_frozen(lightning_package, tmp_path):
    checkpoint = lightning_package.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = _trained_cnn(lightning_package)
    features = _snapshot(model.features)
    first = RevisionFreeze(trainable="head")
    trainer(lightning_package, max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        model, loader(_images(), 8)
    )
    head_after_one = _snapshot(model.head)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert saved == {"frozen_parameter_names": first.frozen_parameter_names}

    resumed = _trained_cnn(lightning_package, seed=1)  # other initial weights: the checkpoint's must come back
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not the same set.*")
        trainer(lightning_package, max_epochs=2, callbacks=[RevisionFreeze(trainable="head")]).fit(
            resumed, loader(_images(), 8), ckpt_path=tmp_path / "last.ckpt"
        )
    _assert_identical(features, resumed.features)  # still the values from before the first fit
    _assert_all_changed(head_after_one, resumed.head)
    assert resumed.step_modes == [(False, False)] * 4


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
def test_resuming_with_another_selection_warns(tmp_path):
    package = pl
    checkpoint = package.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[RevisionFreeze(trainable="head"), checkpoint], enable_checkpointing=True).fit(
        _trained_cnn(package), loader(_images(8), 8)
    )
    with pytest.warns(UserWarning, match="not the same set"):
        trainer(max_epochs=2, callbacks=[RevisionFreeze(freeze_until="features.4")]).fit(
            _trained_cnn(package), loader(_images(8), 8), ckpt_path=tmp_path / "last.ckpt"
        )


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of .* got none"),
        ({"trainable": "head", "frozen": "features"}, "exactly one of .* got trainable, frozen"),
        ({"frozen": "features", "freeze_until": "features.4"}, "got frozen, freeze_until"),
        ({"trainable": []}, "non-empty list"),
        ({"frozen": ["features", 3]}, "non-empty list"),
        ({"freeze_until": ["features"]}, "one submodule path"),
    ],
)
def test_bad_combinations_are_refused_at_construction(kwargs, message):
    with pytest.raises(XAIConfigurationError, match=message):
        RevisionFreeze(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trainable": ["head", "fc"]}, r"no submodule 'fc'; its submodules include \['features', 'features.0'"),
        ({"frozen": "encoder"}, "no submodule 'encoder'"),
        ({"freeze_until": "layer4"}, "no submodule 'layer4'"),
        ({"trainable": ""}, "would freeze nothing"),  # the whole model
        ({"frozen": "features.2"}, "would freeze nothing"),  # a ReLU
        ({"frozen": ["features", "head"]}, "no parameter of .* to train"),
        ({"frozen": ""}, "no parameter of .* to train"),
        ({"freeze_until": "head"}, "no parameter of .* to train"),
    ],
)
def test_bad_paths_are_refused_in_setup_before_anything_changes(kwargs, message):
    model = _trained_cnn(pl)
    before = _snapshot(model)
    with pytest.raises(XAIConfigurationError, match=message):
        trainer(max_epochs=1, callbacks=[RevisionFreeze(**kwargs)]).fit(model, loader(_images(8), 8))
    _assert_identical(before, model)
    assert all(p.requires_grad for p in model.parameters())


def test_the_user_s_own_frozen_head_leaves_nothing_to_train():
    model = _trained_cnn(pl)
    model.head.requires_grad_(False)
    with pytest.raises(XAIConfigurationError, match="no parameter of NormCNN to train"):
        RevisionFreeze(trainable="head").setup(None, model, "fit")
    assert all(p.requires_grad for p in model.features.parameters())


def test_validate_and_test_change_nothing():
    model = _trained_cnn(pl)
    freeze = RevisionFreeze(trainable="head")
    run = trainer(callbacks=[freeze])
    run.validate(model, loader(_images(8), 8), verbose=False)
    assert freeze.frozen_parameter_names == [] and all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------- LightningCLI

#: the proposed callbacks/revision_freeze.yaml; net.3 is the head of the CLI tests' model
CLI_SNIPPET = """\
trainer:
  callbacks:
    - class_path: lightning_xai.callbacks.revision_freeze.RevisionFreeze
      init_args:
        trainable: [net.3]
        norm_eval: true
"""


def test_lightning_cli_builds_the_callback_from_yaml_and_trains_the_head_only(lightning_package, tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    from tests.test_cli_yaml import _build_cli

    config = tmp_path / "revision_freeze.yaml"
    config.write_text(CLI_SNIPPET)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = _build_cli(lightning_package, config, "--trainer.max_steps=2")
    (freeze,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RevisionFreeze)]
    assert freeze.trainable == ["net.3"] and freeze.norm_eval is True
    conv = _snapshot(cli.model.net[0])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    _assert_identical(conv, cli.model.net[0])
    assert freeze.frozen_parameter_names == ["net.0.weight", "net.0.bias"]


# ----------------------------------------------------------------------------------- DDP


@pytest.mark.ddp(timeout=180)
def test_ddp_spawn_keeps_the_frozen_part_identical_without_find_unused_parameters():
    # setup freezes before Lightning wraps the model in DDP, whose reducer then leaves the frozen parameters out;
    # freezing after the wrap would make DDP wait for gradients that never come
    package = pl
    model = _trained_cnn(package)
    features, head = _snapshot(model.features), _snapshot(model.head)
    run = trainer(
        package,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=True,
        max_epochs=1,
        callbacks=[RevisionFreeze(trainable="head")],
    )
    run.fit(model, loader(_images(), 4))  # 4 global batches of 8, 4 samples per rank
    # ddp_spawn loads rank 0's weights and buffers back into this process's model
    _assert_identical(features, model.features)
    _assert_all_changed(head, model.head)
