"""CausaLM on a templated emotion corpus: how much does gender cause a mood classifier's predictions?

Feder et al. (Computational Linguistics 2021). Stage 1 trains a small BERT from scratch with masked
language modelling, then continues two copies for the same steps with the same seed: BERT-O with MLM plus
control heads (the mood; is the person a name?), and BERT-CF with the same plus an adversarial head for
the treated concept (gender), so that the two encoders differ in the adversary only. The corpus confounds
mood with gender, so gender is decorrelated within mood strata. Stage 2 fits the same mood classifier
(logistic regression to convergence) on each frozen encoder, for every label-bias level of
:class:`~lightning_xai.datasets.EmotionTemplates`. Stage 3 compares, on held-out sentences:

* TReATE = mean d(p_O(x), p_CF(x)), the effect of removing gender, estimated without counterfactual text;
* TReATE (flip): the same with each distance divided by ``1 - pi_gender(x)``, the effect of flipping gender.
  A classifier that cannot see gender predicts the prevalence-weighted mixture of both genders'
  predictions, which removal reaches only ``1 - pi`` of the way (half, for a balanced concept);
* ATE_gt = mean d(p_O(x), p_O(x_cf)) on the corpus's gender-swapped twins (the ground truth);
* CONEXP = d(E[p_O | female], E[p_O | male]), the observational difference that confounding fools;

and the accuracy of a fresh linear probe for gender on each encoder, against the majority rate and against
the best guess from the mood alone. With the ``concept-erasure`` package, LEACE (Belrose et al. 2023) erases
gender from BERT-O's features in closed form, as a cheap counterfactual-representation baseline.

    python examples/causalm.py [--bias 0.0 0.2 0.4] [--confounding 0.3] [--classifier logistic]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import transformers
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_xai import XAIMixin
from lightning_xai.callbacks import AdversarialConceptHead, ControlConceptHead
from lightning_xai.datasets import EmotionTemplates
from lightning_xai.datasets.emotion_templates import MOODS, SPECIAL_TOKENS
from lightning_xai.functional import ate_ground_truth, conexp, linear_probe_accuracy, pool, treate

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|litlogger|LeafSpec).*")


class MaskedLM(XAIMixin, pl.LightningModule):
    """A Hugging Face masked language model; the concept heads read its encoder's last hidden state."""

    def __init__(self, mlm: transformers.PreTrainedModel, mask_id: int, special_ids: list[int], lr: float = 1e-3):
        super().__init__()
        self.mlm = mlm
        self.lr = lr
        self.mask_id = mask_id
        self.register_buffer("special_ids", torch.tensor(special_ids), persistent=False)

    @property
    def encoder_layer(self) -> str:
        prefix = self.mlm.base_model_prefix
        if not hasattr(self.mlm.base_model, "encoder"):
            raise SystemExit(
                f"{type(self.mlm).__name__} has no '{prefix}.encoder' submodule for the concept heads; this example "
                "expects a BERT-style encoder (BERT, RoBERTa, MiniLM, ELECTRA)."
            )
        return f"mlm.{prefix}.encoder"

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, attention = batch["input"], batch["attention_mask"]
        maskable = attention.bool() & ~torch.isin(ids, self.special_ids)
        chosen = maskable & (torch.rand(ids.shape, device=ids.device) < 0.15)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        output = self.mlm(input_ids=torch.where(chosen, self.mask_id, ids), attention_mask=attention, labels=labels)
        self.log("mlm_loss", output.loss, on_step=False, on_epoch=True)
        return output.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def features(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        self.eval()
        hidden = self.mlm.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        return pool(hidden, "mean", attention)


def masked_lm(model_path: Path | None, lr: float) -> tuple[MaskedLM, object | None]:
    """A small BERT from scratch on the corpus's own vocabulary, or a pretrained encoder and its tokenizer."""
    if model_path is None:
        config = transformers.BertConfig(
            vocab_size=len(EmotionTemplates.vocabulary),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        special = [EmotionTemplates.vocabulary.index(t) for t in SPECIAL_TOKENS]
        mask_id = SPECIAL_TOKENS.index("[MASK]")
        return MaskedLM(transformers.BertForMaskedLM(config), mask_id, special, lr), None
    # a local directory (save_pretrained layout): nothing is downloaded
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(model_path, local_files_only=True)
    if tokenizer.mask_token_id is None:
        raise SystemExit(f"{model_path}: the tokenizer has no mask token; a masked language model is needed.")
    return MaskedLM(mlm, tokenizer.mask_token_id, list(tokenizer.all_special_ids), lr), tokenizer


def fit(model: pl.LightningModule, data: EmotionTemplates, epochs: int, batch_size: int, callbacks=()) -> float:
    start = time.perf_counter()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=True))
    return time.perf_counter() - start


def train_classifier(
    features: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, kind: str = "logistic"
) -> nn.Module:
    """The mood classifier, the same on either encoder's frozen, mean-pooled features.

    ``"logistic"``: multinomial logistic regression fit to convergence (convex, so the fit does not depend on
    the seed and the two classifiers differ only where their features do). ``"mlp"``: a one-hidden-layer MLP
    trained with Adam for ``epochs``; its seed-to-seed spread (about 0.05-0.07 in total variation on biased
    labels) adds to TReATE.
    """
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    if kind == "logistic":
        classifier: nn.Module = nn.Linear(features.shape[1], len(MOODS))
        optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(classifier(x), labels) + 1e-4 * classifier.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        classifier = nn.Sequential(nn.Linear(features.shape[1], 64), nn.ReLU(), nn.Linear(64, len(MOODS)))
        adam = torch.optim.Adam(classifier.parameters(), lr=3e-3)
        for _ in range(epochs):
            for rows in torch.randperm(features.shape[0]).split(128):
                adam.zero_grad()
                F.cross_entropy(classifier(x[rows]), labels[rows]).backward()
                adam.step()
    classifier.normalize = lambda inputs: (inputs - mean) / std  # type: ignore[assignment]
    return classifier.eval()


@torch.no_grad()
def probabilities(classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return classifier(classifier.normalize(features)).softmax(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bias", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--confounding", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--mlm-epochs", type=int, default=15)
    parser.add_argument("--cf-epochs", type=int, default=120)
    parser.add_argument("--task-epochs", type=int, default=30, help="epochs of the MLP classifier")
    parser.add_argument("--classifier", choices=["logistic", "mlp"], default="logistic")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--cf-batch-size", type=int, default=4000, help="stage-1 CF batches: decorrelation needs accurate covariances"
    )
    parser.add_argument("--objective", choices=["reversal", "confusion", "decorrelation"], default="decorrelation")
    parser.add_argument("--reversal", type=float, default=10.0)
    parser.add_argument(
        "--condition-on-mood",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decorrelate gender within mood strata (the mood is confounded with gender)",
    )
    parser.add_argument(
        "--leace",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also compare LEACE concept erasure on BERT-O's features (needs the concept-erasure package; "
        "default: when it is installed)",
    )
    parser.add_argument(
        "--matched-original",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue BERT-O with MLM + the control heads for as long as BERT-CF (without the adversary)",
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="a local pretrained masked LM and its tokenizer (save_pretrained directory), e.g. a MiniLM; "
        "default: a small BERT trained from scratch on the corpus",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of stage 1 (use ~3e-5 pretrained)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.leace is None:
        args.leace = importlib.util.find_spec("concept_erasure") is not None
    elif args.leace and importlib.util.find_spec("concept_erasure") is None:
        parser.error("--leace needs the concept-erasure package: pip install concept-erasure")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Runs the three stages, prints the table and returns the measured values (per bias level and probes)."""
    args = parse_args(argv)
    console = Console(width=190)
    results: dict[str, object] = {"bias": {}}
    pl.seed_everything(args.seed, verbose=False)

    original, tokenizer = masked_lm(args.model_path, args.lr)

    def corpus(size: int, bias: float, seed: int) -> EmotionTemplates:
        return EmotionTemplates(size, bias=bias, confounding=args.confounding, seed=seed, tokenizer=tokenizer)

    train = corpus(args.size, 0.0, args.seed)
    test = corpus(args.size // 2, 0.0, args.seed + 1)
    encoder_layer = original.encoder_layer
    seconds = fit(original, train, args.mlm_epochs, args.batch_size)
    start = f"{args.model_path}" if args.model_path else "from scratch"
    console.print(f"stage 1: MLM {start} on the corpus ({seconds:.0f} s)")
    counterfactual = copy.deepcopy(original)

    def control_heads() -> list[ControlConceptHead]:
        return [ControlConceptHead(encoder_layer, "is_name", 2), ControlConceptHead(encoder_layer, "mood", len(MOODS))]

    if args.matched_original:
        # BERT-O goes through the same continued training as BERT-CF, minus the adversary, so that the two
        # encoders differ in the treated concept only (the control heads make the mood easier to read)
        pl.seed_everything(args.seed, verbose=False)
        seconds = fit(original, train, args.cf_epochs, args.cf_batch_size, control_heads())
        console.print(f"stage 1: BERT-O, MLM + control heads ({seconds:.0f} s)")
    adversary = AdversarialConceptHead(
        encoder_layer,
        "gender",
        2,
        reversal=args.reversal,
        objective=args.objective,
        schedule="constant",
        condition_key="mood" if args.objective == "decorrelation" and args.condition_on_mood else None,
    )
    heads = [adversary, *control_heads()]
    pl.seed_everything(args.seed, verbose=False)
    seconds = fit(counterfactual, train, args.cf_epochs, args.cf_batch_size, heads)
    console.print(
        f"stage 1: BERT-CF, MLM + adversarial gender head ({args.objective}) + control heads ({seconds:.0f} s); "
        f"head accuracy gender {heads[0].epoch_accuracy:.2f}, is_name {heads[1].epoch_accuracy:.2f}"
    )

    encoders = {"O": original, "CF": counterfactual}
    pad = train.pad_token_id
    features = {
        (name, split): encoder.features(data.inputs, (data.inputs != pad).long())
        for name, encoder in encoders.items()
        for split, data in (("train", train), ("test", test))
    }
    cf_features = {
        name: encoder.features(test.counterfactual_inputs, (test.counterfactual_inputs != pad).long())
        for name, encoder in encoders.items()
    }
    names = list(encoders)
    if args.leace:
        # the closed-form baseline: LEACE erases gender linearly from BERT-O's features (Belrose et al. 2023)
        from concept_erasure import LeaceEraser

        eraser = LeaceEraser.fit(features[("O", "train")], train.genders)
        for split in ("train", "test"):
            features[("LEACE", split)] = eraser(features[("O", split)])
        names.append("LEACE")
    probes = {
        name: linear_probe_accuracy(
            torch.cat([features[(name, "train")], features[(name, "test")]]), torch.cat([train.genders, test.genders])
        )
        for name in names
    }
    controls = {
        name: linear_probe_accuracy(
            torch.cat([features[(name, "train")], features[(name, "test")]]), torch.cat([train.is_name, test.is_name])
        )[0]
        for name in names
    }

    table = Table(title="CausaLM on EmotionTemplates: the effect of gender on a 5-mood classifier (total variation)")
    for column in (
        "label bias",
        "accuracy O",
        "accuracy CF",
        "ATE_gt",
        "TReATE (removal)",
        "TReATE (flip)",
        "|TReATE flip - ATE_gt|",
        *(["TReATE flip (LEACE)"] if args.leace else []),
        "CONEXP",
        "|CONEXP - ATE_gt|",
    ):
        table.add_column(column, justify="right")
    gender_shares = torch.bincount(train.genders, minlength=2).double() / len(train.genders)
    for bias in args.bias:
        labelled_train = corpus(args.size, bias, args.seed)
        labelled_test = corpus(args.size // 2, bias, args.seed + 1)
        classifiers = {
            name: train_classifier(
                features[(name, "train")], labelled_train.targets, args.task_epochs, args.seed, args.classifier
            )
            for name in names
        }
        p_o = probabilities(classifiers["O"], features[("O", "test")])
        p_o_cf = probabilities(classifiers["O"], cf_features["O"])
        p_cf = probabilities(classifiers["CF"], features[("CF", "test")])
        accuracy = {
            name: (probabilities(classifiers[name], features[(name, "test")]).argmax(1) == labelled_test.targets)
            .float()
            .mean()
            .item()
            for name in names
        }
        ate = ate_ground_truth(p_o, p_o_cf)
        removal = treate(p_o, p_cf)
        # the classifiers were trained on `train`: its gender shares are the prevalence the CF classifier mixes by
        flip = {"concept": test.genders, "contrast": "flip", "prevalence": gender_shares}
        estimate = treate(p_o, p_cf, **flip)
        observational = conexp(p_o, test.genders)
        leace = (
            treate(p_o, probabilities(classifiers["LEACE"], features[("LEACE", "test")]), **flip)
            if args.leace
            else None
        )
        results["bias"][bias] = {  # type: ignore[index]
            "ate_gt": ate.value,
            "treate": estimate.value,
            "treate_removal": removal.value,
            **({"treate_leace": leace.value} if leace is not None else {}),
            "conexp": observational.value,
            "accuracy_o": accuracy["O"],
            "accuracy_cf": accuracy["CF"],
        }
        table.add_row(
            f"{bias:g}",
            f"{accuracy['O']:.3f}",
            f"{accuracy['CF']:.3f}",
            f"{ate.value:.3f} [{ate.low:.3f}, {ate.high:.3f}]",
            f"{removal.value:.3f}",
            f"{estimate.value:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]",
            f"{abs(estimate.value - ate.value):.3f}",
            *([f"{leace.value:.3f}"] if leace is not None else []),
            f"{observational.value:.3f}",
            f"{abs(observational.value - ate.value):.3f}",
        )
    console.print(table)
    # gender is partly predictable from the mood alone (confounding): the best a probe can do from the mood
    both_genders = torch.cat([train.genders, test.genders])
    both_moods = torch.cat([train.moods, test.moods])
    counts = torch.zeros(len(MOODS), 2)
    counts.index_put_((both_moods, both_genders), torch.ones(both_moods.shape[0]), accumulate=True)
    mood_floor = (counts.max(1).values.sum() / counts.sum()).item()
    for name in names:
        accuracy, majority = probes[name]
        label = f"BERT-{name}" if name in encoders else f"BERT-O + {name}"
        console.print(
            f"fresh gender probe on {label}: {accuracy:.3f} (majority {majority:.3f}, from the mood alone "
            f"{mood_floor:.3f}); is_name probe {controls[name]:.3f}"
        )
        results[f"probe_{name}"] = accuracy
        results[f"is_name_probe_{name}"] = controls[name]
    results["probe_majority"], results["probe_mood_floor"] = probes["CF"][1], mood_floor
    return results


if __name__ == "__main__":
    main()
