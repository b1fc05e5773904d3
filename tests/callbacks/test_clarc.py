"""RRClArCPenalty and ClArCProjection: the shortcut they remove, the stages they act in, their state and errors.

The shortcut set: sklearn's digits 3 and 8, zero-padded to 12x12 in grey RGB; every training 8 carries a red 2x2
patch in the top-left corner (the artifact, marked by its mask), no training 3 does. On the *swapped* test set the
patch is on every 3 and on no 8, so a model that reads the patch fails there. The network pools its last feature
map globally before the linear head, like the ResNets and VGGs of Reveal to Revise: the RR-ClArC gradient
(averaged over positions) constrains a position-invariant use of the layer. (The flatten head of
``tests.helpers.SmallCNN`` has a weight per position and kept the shortcut under RR-ClArC: swapped accuracy 0.03
at weights 10 to 1000. DecoyDigits is a weak shortcut for these networks: a vanilla SmallCNN reached 0.85 on its
random-level test split.)
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_xai import XAIMixin
from lightning_xai._random import SeededGenerator
from lightning_xai.callbacks import RevisionFreeze
from lightning_xai.callbacks._base import XAICallback
from lightning_xai.callbacks.clarc_projection import ClArCProjection
from lightning_xai.callbacks.rrclarc_penalty import RRClArCPenalty
from lightning_xai.datasets._digits import load_digits_tensors, split_indices
from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError
from lightning_xai.functional.concept_vectors import concept_strength, fit_cav, rrclarc_penalty
from tests.helpers import DictDataset, LSTMTextClassifier, bind, loader, trainer

LAYER = "features"  # the last ReLU's output: what the global max pool hands to the head


@pytest.fixture(autouse=True)
def _one_thread():
    # these networks are tiny: one thread is much faster than two when another process holds a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def red_patch_digits(split: str, swapped: bool = False, seed: int = 0) -> DictDataset:
    images, targets = load_digits_tensors()
    keep = split_indices(targets, split, seed, 0.0, 0.3)
    images, targets = images[keep], targets[keep]
    chosen = (targets == 3) | (targets == 8)
    x = F.pad(images[chosen].unsqueeze(1), (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    y = (targets[chosen] == 8).long()
    has_patch = (y == 0) if swapped else (y == 1)
    mask = torch.zeros(x.shape[0], 1, 12, 12)
    mask[has_patch, :, 0:2, 0:2] = 1.0
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand_as(x)
    return DictDataset(input=torch.where(mask.bool(), red, x), target=y, mask=mask)


class PooledCNNBody(XAIMixin):
    def __init__(self, channels: int = 3, classes: int = 2, lr: float = 0.01, optimizer: str = "adam"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, classes)
        self.lr, self.optimizer = lr, optimizer

    def forward(self, x):
        return self.head(self.features(x).amax((2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["input"]).argmax(1) == batch["target"]).float().mean())

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self(batch["input"]).argmax(1) == batch["target"]).float().mean())

    def predict_step(self, batch, batch_idx):
        return self(batch["input"])

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


PooledCNN = bind(PooledCNNBody)


def accuracy(model: nn.Module, data: DictDataset) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.tensors["input"]).argmax(1) == data.tensors["target"]).float().mean())


@pytest.fixture(scope="module")
def shortcut():
    """A model trained on the shortcut set (10 epochs) and the data; the model relies on the patch."""
    torch.set_num_threads(1)
    train, test, swapped = red_patch_digits("train"), red_patch_digits("test"), red_patch_digits("test", True)
    torch.manual_seed(0)
    model = PooledCNN()
    trainer(max_epochs=10).fit(model, loader(train, 32, shuffle=True))
    return {"state": copy.deepcopy(model.state_dict()), "train": train, "test": test, "swapped": swapped}


def fine_tune(shortcut, callbacks, epochs: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = PooledCNN()
    model.load_state_dict(shortcut["state"])
    trainer(max_epochs=epochs, callbacks=callbacks).fit(model, loader(shortcut["train"], 32, shuffle=True))
    return model


# ------------------------------------------------------------------------------------------------ shortcut removal


def test_rrclarc_fine_tuning_removes_the_shortcut(shortcut):
    vanilla = fine_tune(shortcut, [])
    penalty = RRClArCPenalty(layer=LAYER, weight=100.0)
    corrected = fine_tune(shortcut, [penalty])
    vanilla_swapped, corrected_swapped = (
        accuracy(vanilla, shortcut["swapped"]),
        accuracy(corrected, shortcut["swapped"]),
    )
    # measured: vanilla 0.30, RR-ClArC 0.75 on the swapped test set; both 1.0 on the shortcut-aligned one
    assert corrected_swapped >= vanilla_swapped + 0.3, (vanilla_swapped, corrected_swapped)
    assert accuracy(corrected, shortcut["test"]) >= 0.95
    assert penalty.steps_seen == 80 and penalty.concept.source == "train"
    # the vector was fitted on the trained model, from the patch masks: artifact samples are stronger along it
    assert penalty.cav.shape == (16,) and float(penalty.cav.norm()) == pytest.approx(1.0, abs=1e-6)
    assert penalty.concept.mu_artifact > penalty.concept.mu_clean + 1.0


def test_rrclarc_with_the_layers_up_to_the_corrected_one_frozen_revises_the_head(shortcut):
    # Reveal to Revise's protocol: RevisionFreeze keeps the layers up to the corrected one as they were
    frozen_only = fine_tune(shortcut, [RevisionFreeze(freeze_until=LAYER)])
    corrected = fine_tune(shortcut, [RevisionFreeze(freeze_until=LAYER), RRClArCPenalty(layer=LAYER, weight=100.0)])
    before, after = accuracy(frozen_only, shortcut["swapped"]), accuracy(corrected, shortcut["swapped"])
    # measured: 0.58 with the head fine-tuned alone, 0.89 with RR-ClArC (0.79 at weight 10, 0.93 at 1000)
    assert after >= before + 0.2, (before, after)
    for name, value in corrected.features.state_dict().items():
        assert torch.equal(value, shortcut["state"][f"features.{name}"]), name


def test_aclarc_fine_tuning_with_the_artifact_everywhere_lowers_the_reliance(shortcut):
    vanilla = fine_tune(shortcut, [])
    projection = ClArCProjection(layer=LAYER, mode="a")
    corrected = fine_tune(shortcut, [projection])
    vanilla_swapped, corrected_swapped = (
        accuracy(vanilla, shortcut["swapped"]),
        accuracy(corrected, shortcut["swapped"]),
    )
    # measured: vanilla 0.30, A-ClArC 0.53
    assert corrected_swapped >= vanilla_swapped + 0.15, (vanilla_swapped, corrected_swapped)
    assert projection.projected_batches == 80  # one forward per training step, none in a fit without validation
    assert not projection.active and not corrected.features._forward_hooks  # removed after fit


def test_pclarc_at_test_moves_predictions_towards_those_on_clean_inputs(shortcut):
    model = PooledCNN()
    model.load_state_dict(shortcut["state"])
    swapped = shortcut["swapped"]
    inputs, clean = swapped.tensors["input"], swapped.tensors["input"] * (1 - swapped.tensors["mask"])
    with torch.no_grad():
        model.eval()
        plain, on_clean = model(inputs).argmax(1), model(clean).argmax(1)
    projection = ClArCProjection(layer=LAYER, mode="p")
    projection.fit_cav(model, loader(shortcut["train"], 64))
    assert projection.concept.source == "fit_cav" and projection.strength == projection.concept.mu_clean
    run = trainer(callbacks=[projection])
    corrected = torch.cat(run.predict(model, loader(swapped, 256))).argmax(1)
    agree_plain = float((plain == on_clean).float().mean())
    agree_corrected = float((corrected == on_clean).float().mean())
    # measured: 0.85 of the plain predictions and 0.93 of the corrected ones agree with those on clean inputs
    assert agree_corrected >= agree_plain + 0.05, (agree_plain, agree_corrected)
    assert float((corrected == swapped.tensors["target"]).float().mean()) >= accuracy(model, swapped) + 0.05
    metrics = run.test(model, loader(swapped, 256), verbose=False)[0]
    assert metrics["test_acc"] == pytest.approx(float((corrected == swapped.tensors["target"]).float().mean()))
    assert not projection.active and not model.features._forward_hooks


def test_pclarc_sets_every_samples_concept_strength_to_the_clean_mean(shortcut):
    model = PooledCNN()
    model.load_state_dict(shortcut["state"])
    projection = ClArCProjection(layer=LAYER, mode="p")
    seen = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    run = trainer(callbacks=[projection])
    run.predict(model, loader(shortcut["swapped"], 64))  # no vector yet: fitted from the predict loader's masks
    assert projection.concept.source == "predict"
    assert projection.projected_batches == 2
    predicted = torch.cat(seen)[-len(shortcut["swapped"]) :]  # before them: the fit's forwards, not projected
    strengths = concept_strength(predicted, projection.cav)  # the head's input is maxpool(a')
    torch.testing.assert_close(strengths, torch.full_like(strengths, projection.concept.mu_clean), atol=1e-4, rtol=0)


def test_pclarc_acts_in_evaluation_only_and_follows_the_model_through_fit(shortcut, lightning_package):
    projection = ClArCProjection(layer=LAYER, mode="p")
    states = {"train": set(), "validate": set()}

    class Record(XAICallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states["train"].add(projection.active)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            states["validate"].add((trainer.sanity_checking, projection.active))

    model = bind(PooledCNNBody, lightning_package)()
    model.load_state_dict(shortcut["state"])
    run = trainer(
        lightning_package, max_epochs=2, callbacks=[projection, Record()], num_sanity_val_steps=1, limit_val_batches=1
    )
    run.fit(model, loader(shortcut["train"], 32), loader(shortcut["swapped"], 32))
    assert states == {"train": {False}, "validate": {(True, False), (False, True)}}
    fitted = projection.cav.clone()
    run.test(model, loader(shortcut["swapped"], 64), verbose=False)
    assert torch.equal(projection.cav, fitted) and projection.concept.source == "train"  # fitted at the end of fit


def test_aclarc_is_off_in_validation_inside_fit(shortcut, lightning_package):
    projection = ClArCProjection(layer=LAYER, mode="a")
    states = {"train": set(), "validate": set()}

    class Record(XAICallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states["train"].add(projection.active)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            states["validate"].add(projection.active)

    model = bind(PooledCNNBody, lightning_package)()
    model.load_state_dict(shortcut["state"])
    run = trainer(
        lightning_package, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[projection, Record()]
    )
    run.fit(model, loader(shortcut["train"], 32), loader(shortcut["swapped"], 32))
    assert states == {"train": {True}, "validate": {False}}
    assert projection.projected_batches == 4
    run.test(model, loader(shortcut["swapped"], 64), verbose=False)  # mode "a" never acts at test
    assert projection.projected_batches == 4


# ------------------------------------------------------------------------------------------------ the loss term


def test_one_step_equals_the_functional_penalty_on_the_batch():
    data = red_patch_digits("train")
    batch = {k: v[:16] for k, v in data.tensors.items()}
    torch.manual_seed(1)
    model = PooledCNN(optimizer="sgd", lr=0.1)
    reference = copy.deepcopy(model)
    cav = torch.linspace(-1.0, 1.0, 16)
    weight = 5.0
    penalty = RRClArCPenalty(layer=LAYER, weight=weight, cav=cav, seed=3)
    run = trainer(max_steps=1, callbacks=[penalty])
    run.fit(model, loader(DictDataset(**batch), 16))
    term = rrclarc_penalty(
        reference, batch["input"], reference.features, cav / cav.norm(), generator=SeededGenerator(3).generator
    )
    loss = F.cross_entropy(reference(batch["input"]), batch["target"]) + weight * term
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    for (name, parameter), before, gradient in zip(model.named_parameters(), reference.parameters(), gradients):
        torch.testing.assert_close(parameter, before.detach() - 0.1 * gradient, atol=1e-5, rtol=1e-4, msg=name)
    assert penalty.concept.source == "given" and penalty.concept.mu_clean is None  # nothing was fitted


def test_the_vector_is_fitted_from_masked_pairs_in_eval_mode_without_touching_the_rng():
    data = red_patch_digits("train")
    model = PooledCNN()
    model.train()
    penalty = RRClArCPenalty(layer=LAYER, cav_batches=2)
    penalty.concept.setup(model)
    before = torch.get_rng_state()
    penalty.concept.fit(model, loader(data, 16, shuffle=True))
    assert torch.equal(torch.get_rng_state(), before) and model.training and model.features[0].training
    # by hand: the annotated samples of the first two batches of the seeded shuffle, and their patch-free versions
    ordered = RRClArCPenalty(layer=LAYER, cav_batches=2, seed=5)
    ordered.concept.setup(model)
    ordered.concept.fit(model, loader(data, 16))  # the given loader's order does not matter
    shuffle = DataLoader(range(len(data)), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    chosen = torch.cat(list(itertools.islice(shuffle, 2)))
    rows = chosen[data.tensors["mask"][chosen].flatten(1).sum(1) > 0]
    x, m = data.tensors["input"][rows], data.tensors["mask"][rows]
    model.eval()
    with torch.no_grad():
        artifact, clean = model.features(x).amax((2, 3)), model.features(x * (1 - m)).amax((2, 3))
    labels = torch.cat([torch.ones(len(x)), torch.zeros(len(x))])
    expected = fit_cav(torch.cat([artifact, clean]), labels)
    torch.testing.assert_close(ordered.cav, expected, atol=1e-5, rtol=1e-4)
    assert ordered.concept.mu_clean == pytest.approx(float(concept_strength(clean, expected).mean()), rel=1e-4)
    assert ordered.concept.mu_artifact == pytest.approx(float(concept_strength(artifact, expected).mean()), rel=1e-4)


def test_token_ids_get_their_clean_version_from_clean_token_id():
    torch.manual_seed(0)
    n, length = 32, 6
    labels = torch.randint(0, 2, (n,))
    ids = torch.randint(4, 40, (n, length))
    ids[:, 2] = labels + 1  # the decoy token
    mask = torch.zeros(n, length)
    mask[:, 2] = 1.0
    data = DictDataset(input_ids=ids, labels=labels, mask=mask)
    model = LSTMTextClassifier()
    penalty = RRClArCPenalty(weight=1.0, clean_token_id=3, criterion="logprobs")
    run = trainer(max_steps=2, callbacks=[penalty], logger=False)
    run.fit(model, loader(data, 16))
    assert penalty.layer == "lstm" and penalty.cav.shape == (16,)  # the (N, T, hidden) output: channels last
    assert float(run.callback_metrics["xai/rrclarc"]) > 0
    # the fit compared each sample with its copy whose decoy token became 3
    model.eval()
    with torch.no_grad():
        artifact = model.lstm(model.embedding(ids[:16]))[0].amax(1)
        clean_ids = ids[:16].clone()
        clean_ids[:, 2] = 3
        clean = model.lstm(model.embedding(clean_ids))[0].amax(1)
    assert penalty.concept.mu_artifact != penalty.concept.mu_clean
    refit = fit_cav(torch.cat([artifact, clean]), torch.cat([torch.ones(16), torch.zeros(16)]))
    assert refit.shape == penalty.cav.shape


# ------------------------------------------------------------------------------------------------ state


def test_state_dict_round_trip_keeps_the_vector_means_and_random_stream(shortcut):
    penalty = RRClArCPenalty(layer=LAYER, weight=10.0)
    fine_tune(shortcut, [penalty], epochs=1)
    state = penalty.state_dict()
    assert {"cav", "mu_clean", "mu_artifact", "generator", "layer", "steps_seen"} <= set(state)
    restored = RRClArCPenalty(layer=LAYER, weight=10.0)
    restored.load_state_dict(copy.deepcopy(state))
    assert torch.equal(restored.cav, penalty.cav) and restored.concept.mu_clean == penalty.concept.mu_clean
    assert torch.equal(
        torch.rand(4, generator=restored.random.generator), torch.rand(4, generator=penalty.random.generator)
    )
    projection = ClArCProjection(layer=LAYER, mode="p", cav=[1.0] * 16, strength=0.5)
    again = ClArCProjection(layer=LAYER, mode="p")
    again.load_state_dict(projection.state_dict())
    assert torch.equal(again.cav, projection.cav) and again.concept.source == "given"


def test_two_named_callbacks_of_each_kind_coexist_on_one_trainer(lightning_package):
    data = loader(red_patch_digits("train"), 32)
    first, second = RRClArCPenalty(layer=LAYER, cav_batches=2), RRClArCPenalty(layer="features.0", name="early")
    projections = [ClArCProjection(layer=LAYER, mode="a"), ClArCProjection(layer="features.0", mode="a", name="a0")]
    assert len({c.state_key for c in (first, second, *projections)}) == 4
    run = trainer(lightning_package, max_steps=2, callbacks=[first, second, *projections])
    run.fit(bind(PooledCNNBody, lightning_package)(), data)
    assert {"xai/rrclarc", "xai/early"} <= set(run.callback_metrics)
    assert first.cav.shape == (16,) and second.cav.shape == (8,) and second.layer == "features.0"
    # each training step: the step's forward and the two penalties' own forwards, all with the artifact added
    assert [p.projected_batches for p in projections] == [6, 6]
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(lightning_package, callbacks=[RRClArCPenalty(), RRClArCPenalty()])


def test_resume_keeps_the_fitted_vector(shortcut, tmp_path):
    penalty = RRClArCPenalty(layer=LAYER, weight=10.0)
    torch.manual_seed(0)
    model = PooledCNN()
    model.load_state_dict(shortcut["state"])
    run = trainer(max_epochs=1, callbacks=[penalty])
    run.fit(model, loader(shortcut["train"], 32))
    path = tmp_path / "last.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["callbacks"][penalty.state_key]["cav"], penalty.cav)
    resumed = RRClArCPenalty(layer=LAYER, weight=10.0)
    # another loader: a refit would find another vector there (the swapped set's patches are on the 3s)
    run = trainer(max_epochs=2, callbacks=[resumed])
    run.fit(PooledCNN(), loader(shortcut["swapped"], 32), ckpt_path=path)
    assert torch.equal(resumed.cav, penalty.cav) and resumed.concept.source == "train"
    assert resumed.steps_seen == penalty.steps_seen + 4  # one more epoch of the 4 swapped batches
    other = RRClArCPenalty(layer=LAYER, cav_batches=4)
    other.concept.setup(model)
    other.concept.fit(model, loader(shortcut["swapped"], 32))
    assert not torch.allclose(other.cav, penalty.cav, atol=1e-3)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_configurations_raise_early_with_the_fix():
    with pytest.raises(XAIConfigurationError, match="criterion must be one of"):
        RRClArCPenalty(criterion="mean_logit")  # type: ignore[arg-type]
    with pytest.raises(XAIConfigurationError, match="cav_method must be one of"):
        RRClArCPenalty(cav_method="lda")
    with pytest.raises(XAIConfigurationError, match="cav_batches must be an integer >= 1"):
        ClArCProjection(cav_batches=0)
    with pytest.raises(XAIConfigurationError, match="mode must be one of"):
        ClArCProjection(mode="r")  # type: ignore[arg-type]
    with pytest.raises(XAIConfigurationError, match="finite and nonzero"):
        RRClArCPenalty(cav=[0.0, 0.0])
    data = loader(red_patch_digits("train"), 32)
    with pytest.raises(XAIConfigurationError, match="has no submodule 'backbone'"):
        trainer(max_steps=1, callbacks=[RRClArCPenalty(layer="backbone")]).fit(PooledCNN(), data)
    with pytest.raises(XAIConfigurationError, match="has 5 entries, but layer 'features' has 16 channels"):
        trainer(max_steps=1, callbacks=[RRClArCPenalty(layer=LAYER, cav=torch.ones(5))]).fit(PooledCNN(), data)
    with pytest.raises(XAIConfigurationError, match="has 5 entries, but layer 'features.3' has 16 channels"):
        trainer(callbacks=[ClArCProjection(cav=torch.ones(5), strength=0.0)]).predict(PooledCNN(), data)


def test_fitting_needs_masks_that_mark_an_artifact():
    data = red_patch_digits("train")
    no_mask = DictDataset(input=data.tensors["input"], target=data.tensors["target"])
    with pytest.raises(MissingBatchKeyError, match="batch key 'mask'.*give the vector"):
        trainer(max_steps=1, callbacks=[RRClArCPenalty(layer=LAYER)]).fit(PooledCNN(), loader(no_mask, 32))
    empty = DictDataset(
        input=data.tensors["input"], target=data.tensors["target"], mask=torch.zeros(len(data), 1, 12, 12)
    )
    with pytest.raises(XAIConfigurationError, match="no sample of the first 20 batches has a non-empty mask"):
        trainer(max_steps=1, callbacks=[ClArCProjection(layer=LAYER, mode="a")]).fit(PooledCNN(), loader(empty, 32))


# ------------------------------------------------------------------------------------------------ DDP


class AgreeOnTheVector(XAICallback):
    """Runs after the penalty's ``on_train_start`` in every worker: all ranks hold the expected vector."""

    def __init__(self, penalty: RRClArCPenalty, expected: torch.Tensor) -> None:
        super().__init__(name="agree")
        self.penalty, self.expected = penalty, expected

    def on_train_start(self, trainer, pl_module):
        gathered = pl_module.all_gather(self.penalty.cav.to(pl_module.device))
        assert gathered.shape == (2, 16)
        assert torch.equal(gathered[0], gathered[1])
        torch.testing.assert_close(self.penalty.cav, self.expected, atol=1e-5, rtol=1e-4)


@pytest.mark.ddp
def test_ddp_ranks_correct_along_one_vector():
    data = red_patch_digits("train")
    torch.manual_seed(0)
    model = PooledCNN()
    single = RRClArCPenalty(layer=LAYER, cav_batches=3)
    single.concept.setup(model)
    single.concept.fit(model, loader(data, 16))  # the dataset's seeded shuffle: what every rank reads
    penalty = RRClArCPenalty(layer=LAYER, cav_batches=3, weight=10.0)
    run = trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        use_distributed_sampler=True,
        callbacks=[penalty, AgreeOnTheVector(penalty, single.cav)],
    )
    run.fit(model, loader(data, 16))  # a failed assertion in a worker fails the spawn
    assert run.state.finished
