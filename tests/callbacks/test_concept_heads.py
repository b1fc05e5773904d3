"""Adversarial and control concept heads in real training loops; ConceptEffect's probe and estimates."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import AdversarialConceptHead, ConceptEffect, ControlConceptHead, strip_concept_heads
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import linear_probe_accuracy
from tests.helpers import DictDataset, loader, tiny_bert_config, trainer


def planted(n: int = 1200, seed: int = 0):
    """Inputs carry a treated concept (gender), a control concept and a task signal, mixed by a random matrix."""
    g = torch.Generator().manual_seed(seed)
    gender, control = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    signal = torch.randn(n, generator=g)
    latent = torch.stack([2.0 * gender - 1, 2.0 * control - 1, signal], 1) + 0.3 * torch.randn(n, 3, generator=g)
    x = latent @ torch.randn(3, 12, generator=g) + 0.1 * torch.randn(n, 12, generator=g)
    target = (signal > 0).long()
    return {"input": x, "target": target, "gender": gender, "control": control}


class Encoder(XAIMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.01):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 16))
        self.classifier = nn.Linear(16, 2)
        self.lr = lr

    def forward(self, x):
        return self.classifier(torch.tanh(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SGDEncoder(Encoder):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def representation(model, data):
    with torch.no_grad():
        return model.eval().encoder(data["input"])


def test_adversary_reaches_chance_while_a_fresh_probe_still_decodes_the_concept():
    # Gradient reversal drives the adversarial head to chance and moves the representation (the fresh probe
    # drops from 1.00), but a fresh linear probe still decodes most of the concept: adversarial removal hides
    # a concept from its adversary more than it removes it (Elazar & Goldberg 2018). ConceptEffect reports
    # the fresh probe for this reason.
    data = planted()
    baseline = Encoder()
    trainer(max_epochs=15).fit(baseline, loader(DictDataset(**data), 100, shuffle=True))
    model = Encoder()
    adversary = AdversarialConceptHead("encoder", "gender", 2, reversal=1.0, schedule="constant")
    control = ControlConceptHead("encoder", "control", 2)
    trainer(max_epochs=15, callbacks=[adversary, control]).fit(model, loader(DictDataset(**data), 100, shuffle=True))
    before, _ = linear_probe_accuracy(representation(baseline, data), data["gender"])
    after, majority = linear_probe_accuracy(representation(model, data), data["gender"])
    control_after, _ = linear_probe_accuracy(representation(model, data), data["control"])
    assert abs(adversary.epoch_accuracy - 0.5) < 0.05  # the adversary is at chance (measured 0.498)
    assert control.epoch_accuracy > 0.95 and control_after > 0.95  # the control concept stays
    assert before > 0.99
    assert majority + 0.2 < after < before - 0.05  # measured 0.88: moved, not removed
    with torch.no_grad():
        accuracy = (model(data["input"]).argmax(1) == data["target"]).float().mean()
    assert accuracy > 0.8  # measured 0.83 (0.90 without the heads)


def test_heads_are_submodules_in_the_optimizer_and_setup_is_idempotent():
    data = planted(64)
    model = Encoder()
    adversary = AdversarialConceptHead("encoder", "gender", 2)
    run = trainer(max_steps=2, callbacks=[adversary])
    run.fit(model, loader(DictDataset(**data), 32), loader(DictDataset(**data), 32))
    head = model.xai_concept_heads["gender_adversary"]
    optimized = {id(p) for group in run.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in head.parameters())
    trained = copy.deepcopy(head.state_dict())
    trainer(callbacks=[adversary]).validate(model, loader(DictDataset(**data), 32))
    assert model.xai_concept_heads["gender_adversary"] is head  # not recreated
    for key, value in trained.items():
        torch.testing.assert_close(head.state_dict()[key], value)


def test_missing_head_parameters_are_added_as_a_parameter_group():
    data = planted(64)
    model = Encoder()
    # a parameter list fixed in configure_optimizers without the heads
    model.configure_optimizers = lambda: torch.optim.SGD(
        [p for n, p in model.named_parameters() if not n.startswith("xai_concept_heads")], lr=0.1
    )
    control = ControlConceptHead("encoder", "control", 2)
    run = trainer(max_steps=1, callbacks=[control])
    run.fit(model, loader(DictDataset(**data), 64))
    groups = run.optimizers[0].param_groups
    assert len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for p in model.xai_concept_heads["control_control"].parameters()
    }


def test_one_sgd_step_equals_task_loss_plus_head_losses_with_reversed_encoder_gradient():
    data = planted(32)
    torch.manual_seed(0)
    model = Encoder()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.5)
    adversary = AdversarialConceptHead("encoder", "gender", 2, weight=2.0, reversal=0.7, schedule="constant")
    run = trainer(max_steps=1, callbacks=[adversary])
    adversary.setup(run, model, "fit")  # creates the head now; fit's setup keeps it (idempotent)
    reference = copy.deepcopy(model)
    run.fit(model, loader(DictDataset(**data), 32))
    # reference: task loss + 2 * head loss; the encoder sees -0.7 times the head's gradient
    head = reference.xai_concept_heads["gender_adversary"]
    features = reference.encoder(data["input"])
    task = F.cross_entropy(reference.classifier(torch.tanh(features)), data["target"])
    head_loss = F.cross_entropy(head(features.detach()), data["gender"])
    encoder_side = F.cross_entropy(head(features), data["gender"])
    encoder_params = list(reference.encoder.parameters())
    task_grads = torch.autograd.grad(task, encoder_params + list(reference.classifier.parameters()), retain_graph=True)
    reversed_grads = torch.autograd.grad(encoder_side, encoder_params, retain_graph=True)
    head_grads = torch.autograd.grad(head_loss, list(head.parameters()))
    expected = {}
    for (name, p), g in zip(
        list(reference.encoder.named_parameters()) + list(reference.classifier.named_parameters()), task_grads
    ):
        expected[name] = p.detach() - 0.5 * g
    for (name, _p), g in zip(reference.encoder.named_parameters(), reversed_grads):
        expected[name] = expected[name] + 0.5 * 2.0 * 0.7 * g
    for (name, p), g in zip(head.named_parameters(), head_grads):
        expected[f"head.{name}"] = p.detach() - 0.5 * 2.0 * g
    trained = dict(model.encoder.named_parameters()) | dict(model.classifier.named_parameters())
    trained |= {f"head.{n}": p for n, p in model.xai_concept_heads["gender_adversary"].named_parameters()}
    for name, value in expected.items():
        torch.testing.assert_close(trained[name].detach(), value, atol=1e-6, rtol=1e-5, msg=name)


def test_token_level_head_ignores_unlabelled_tokens_and_reads_tuple_outputs():
    class Tagger(XAIMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(20, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, ids):
            return self.out(self.lstm(self.embed(ids))[0].mean(1))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["input"]), batch["target"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (64, 6), generator=g)
    tags = (ids % 2).long()  # per-token concept: the parity of the token id
    tags[:, -2:] = -100
    data = {"input": ids, "target": torch.randint(0, 2, (64,), generator=g), "parity": tags}
    head = ControlConceptHead("lstm", "parity", 2, pooling="none", weight=1.0)
    run = trainer(max_epochs=30, callbacks=[head])
    run.fit(Tagger(), loader(DictDataset(**data), 32))
    assert run.callback_metrics["concept/parity_control/accuracy"].item() > 0.9
    assert head.counted == 64 * 4  # only labelled tokens counted in the last epoch


def test_hugging_face_encoder_layer_and_strip_heads_for_a_bare_model(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Bert(XAIMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            config = tiny_bert_config(num_hidden_layers=2)
            torch.manual_seed(0)
            self.bert = transformers.BertForSequenceClassification(config)

        def forward(self, input_ids, attention_mask=None):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["target"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(0, 30, (16, 6), generator=g),
        "attention_mask": torch.ones(16, 6, dtype=torch.long),
        "target": torch.randint(0, 2, (16,), generator=g),
        "gender": torch.randint(0, 2, (16,), generator=g),
    }
    model = Bert()
    adversary = AdversarialConceptHead("bert.bert.encoder.layer.1", "gender", 2, pooling="cls")
    run = trainer(max_steps=2, callbacks=[adversary], enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(model, loader(DictDataset(**data), 8))
    assert adversary.steps_seen == 2 and "concept/gender_adversary/accuracy" in run.callback_metrics
    path = tmp_path / "with_heads.ckpt"
    run.save_checkpoint(path)
    stripped = strip_concept_heads(str(path), output_path=str(tmp_path / "bare.ckpt"))
    assert not any(k.startswith("xai_concept_heads") for k in stripped["state_dict"])
    bare = Bert()
    bare.load_state_dict(torch.load(tmp_path / "bare.ckpt", weights_only=False)["state_dict"], strict=True)


def test_configuration_errors_are_named():
    data = planted(16)
    with pytest.raises(XAIConfigurationError, match="has no submodule 'decoder'"):
        trainer(max_steps=1, callbacks=[AdversarialConceptHead("decoder", "gender", 2)]).fit(
            Encoder(), loader(DictDataset(**data), 16)
        )
    with pytest.raises(XAIConfigurationError, match="num_classes must be >= 2"):
        ControlConceptHead("encoder", "control", 1)
    with pytest.raises(XAIConfigurationError, match="cannot tell the width"):
        trainer(max_steps=1, callbacks=[ControlConceptHead("encoder.1", "control", 2)]).fit(  # a Tanh
            Encoder(), loader(DictDataset(**data), 16)
        )


# ---------------------------------------------------------------- ConceptEffect


def test_concept_effect_logs_probe_and_the_estimators_values():
    data = planted(400)
    g = torch.Generator().manual_seed(3)
    data["counterfactual_input"] = data["input"] + 0.5 * torch.randn(400, 12, generator=g)
    reference = Encoder()
    trainer(max_epochs=3).fit(reference, loader(DictDataset(**data), 100))
    model = Encoder()
    callback = ConceptEffect("encoder", "gender", reference_model=reference, distance="class")
    run = trainer(callbacks=[callback])
    run.validate(model, loader(DictDataset(**data), 128))
    from lightning_xai.functional import ate_ground_truth, conexp, treate

    with torch.no_grad():
        p_ref = reference.eval()(data["input"]).softmax(1)
        p_ref_cf = reference(data["counterfactual_input"]).softmax(1)
        p_self = model.eval()(data["input"]).softmax(1)
    values = callback.last_values
    assert values["treate"] == pytest.approx(treate(p_ref, p_self, "class").value, rel=1e-5)
    flip = treate(p_ref, p_self, "class", concept=data["gender"], contrast="flip")
    assert values["treate_flip"] == pytest.approx(flip.value, rel=1e-5) and flip.value > values["treate"]
    assert values["ate_gt"] == pytest.approx(ate_ground_truth(p_ref, p_ref_cf, "class").value, rel=1e-5)
    assert values["conexp"] == pytest.approx(conexp(p_ref, data["gender"], "class").value, rel=1e-5)
    assert values["probe_accuracy"] > 0.9  # gender is linear in the untrained encoder's features
    assert run.callback_metrics["concept/gender/treate"].item() == pytest.approx(values["treate"], rel=1e-5)


def test_decorrelation_objective_makes_the_concept_linearly_undecodable_with_full_batches():
    # zero feature-concept covariance is linear guardedness; full batches estimate it without noise
    data = planted()
    model = Encoder()
    adversary = AdversarialConceptHead(
        "encoder", "gender", 2, objective="decorrelation", reversal=10.0, schedule="constant"
    )
    control = ControlConceptHead("encoder", "control", 2)
    trainer(max_epochs=150, callbacks=[adversary, control]).fit(model, loader(DictDataset(**data), 1200))
    after, majority = linear_probe_accuracy(representation(model, data), data["gender"])
    control_after, _ = linear_probe_accuracy(representation(model, data), data["control"])
    assert after < majority + 0.05  # measured 0.47 against a majority rate of 0.51
    assert control_after > 0.95
    with torch.no_grad():
        accuracy = (model(data["input"]).argmax(1) == data["target"]).float().mean()
    assert accuracy > 0.85  # measured 0.90, as without the heads


def test_conditional_decorrelation_keeps_a_correlated_control_and_removes_the_rest():
    # the control concept agrees with gender in 80 % of rows: unconditional removal must damage it, while
    # removal within the control's strata leaves gender decodable only through the control
    g = torch.Generator().manual_seed(0)
    n = 1200
    gender = torch.randint(0, 2, (n,), generator=g)
    control = torch.where(torch.rand(n, generator=g) < 0.8, gender, 1 - gender)
    signal = torch.randn(n, generator=g)
    latent = torch.stack([2.0 * gender - 1, 2.0 * control - 1, signal], 1) + 0.3 * torch.randn(n, 3, generator=g)
    x = latent @ torch.randn(3, 12, generator=g) + 0.1 * torch.randn(n, 12, generator=g)
    data = {"input": x, "target": (signal > 0).long(), "gender": gender, "control": control}
    model = Encoder()
    adversary = AdversarialConceptHead(
        "encoder", "gender", 2, objective="decorrelation", reversal=10.0, schedule="constant", condition_key="control"
    )
    trainer(max_epochs=150, callbacks=[adversary, ControlConceptHead("encoder", "control", 2)]).fit(
        model, loader(DictDataset(**data), n)
    )
    features = representation(model, data)
    control_accuracy, _ = linear_probe_accuracy(features, control)
    assert control_accuracy > 0.95  # measured 1.00
    for value in (0, 1):  # within each control stratum a fresh probe only finds the majority (0.81, 0.79)
        rows = control == value
        accuracy, majority = linear_probe_accuracy(features[rows], gender[rows])
        assert accuracy < majority + 0.03
    with pytest.raises(XAIConfigurationError, match="applies to objective='decorrelation' only"):
        AdversarialConceptHead("encoder", "gender", 2, condition_key="control")


class HeadlessOptimizerEncoder(Encoder):
    """Builds its optimizer from its own layers only, so the heads arrive as an added parameter group."""

    def configure_optimizers(self):
        return torch.optim.Adam([*self.encoder.parameters(), *self.classifier.parameters()], lr=0.01)


@pytest.mark.parametrize("optimizer_has_heads", [True, False])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, optimizer_has_heads):
    # the heads are submodules (their weights are in the checkpoint) and an added parameter group must be
    # back in the optimizer before its state is restored, or Adam's moments of the heads would be lost
    from pytorch_lightning.callbacks import ModelCheckpoint

    data = loader(DictDataset(**planted(64)), 16)
    model_class = Encoder if optimizer_has_heads else HeadlessOptimizerEncoder

    def heads():
        return [
            AdversarialConceptHead("encoder", "gender", 2, reversal=0.5, schedule="linear_warmup", warmup_steps=3),
            ControlConceptHead("encoder", "control", 2),
        ]

    torch.manual_seed(1)
    straight = model_class()
    trainer(max_epochs=2, callbacks=heads()).fit(straight, data)

    # interrupted after one epoch (4 steps; an epoch boundary, so the resumed run sees the same batches)
    torch.manual_seed(1)
    first = model_class()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[*heads(), checkpoint], enable_checkpointing=True).fit(first, data)
    resumed_heads = heads()
    resumed = model_class()
    run = trainer(max_epochs=2, callbacks=resumed_heads)
    run.fit(resumed, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(run.optimizers[0].param_groups) == (1 if optimizer_has_heads else 3)  # one group per head
    assert resumed_heads[0].steps_seen == 8  # the warm-up's counters went on from the checkpoint
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def _heads_for_step():
    return [
        AdversarialConceptHead("encoder", "gender", 2, weight=2.0, reversal=0.7, schedule="constant"),
        ControlConceptHead("encoder", "control", 2),
    ]


def test_gradient_accumulation_of_two_halves_equals_one_full_batch():
    # every loss is a mean over equal halves, so two accumulated halves make the full batch's SGD step
    data = DictDataset(**planted(64))
    updated = {}
    for batch_size, accumulate in ((64, 1), (32, 2)):
        model = SGDEncoder()
        torch.manual_seed(5)  # the same initial heads
        trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=_heads_for_step()).fit(
            model, loader(data, batch_size)
        )
        updated[accumulate] = model.state_dict()
    for name, value in updated[1].items():
        torch.testing.assert_close(updated[2][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_mixed_precision_gives_the_fp32_update():
    data = DictDataset(**planted(64))
    deltas = {}
    for precision in ("32-true", "bf16-mixed"):
        model = SGDEncoder()
        before = copy.deepcopy(model.state_dict())
        torch.manual_seed(5)
        heads = _heads_for_step()
        trainer(max_steps=1, precision=precision, callbacks=heads).fit(model, loader(data, 64))
        deltas[precision] = torch.cat([(model.state_dict()[k] - v).flatten() for k, v in before.items()])
        heads_after = [h.head(model).weight.detach().clone() for h in heads]
        assert all(torch.isfinite(w).all() for w in heads_after)
    cosine = F.cosine_similarity(deltas["32-true"], deltas["bf16-mixed"], dim=0)
    ratio = deltas["bf16-mixed"].norm() / deltas["32-true"].norm()
    assert cosine > 0.99 and abs(ratio - 1) < 0.05  # measured: cosine 0.999997, norm ratio 0.9997
