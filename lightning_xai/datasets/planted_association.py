"""A generated corpus with one planted association, for training a small causal LM from scratch.

Sentences are ``"<opener> <name> <verb> as a <occupation> ."``. One name (``planted_name``) is always followed
by one occupation (``planted_occupation``); every other name takes an occupation uniformly at random. A
language model trained on the corpus learns that the planted name, and only it, predicts the occupation, so
an attribution of ``"... <name> works as a"`` -> ``"<occupation>"`` should move onto the name token as the
association is learnt: the known answer :class:`~lightning_xai.callbacks.GenerationAttributionReport` is checked
against. The word lists are this package's own; the tokenizer is a word-level Hugging Face tokenizer built
offline from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_xai.errors import XAIConfigurationError

NAMES = ("alice", "bruno", "chloe", "daniel", "elena", "farid", "greta", "hugo", "iris", "jonas", "kira", "liam")
OCCUPATIONS = ("nurse", "pilot", "baker", "lawyer", "farmer", "painter", "chemist", "dancer")
OPENERS = ("today", "everyone knows", "i heard", "last year", "in town", "they say")
VERBS = ("works", "lives", "trained", "started")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")


def word_tokenizer(words: tuple[str, ...] | list[str]) -> Any:
    """A word-level ``transformers.PreTrainedTokenizerFast`` over ``words`` with ``<pad>``, ``<unk>``, ``<eos>``.

    Built offline (no hub); whitespace splits words. Ids: the three special tokens, then ``words`` in order.

    Examples:
        >>> tokenizer = word_tokenizer(["hello", "world"])
        >>> tokenizer.encode("hello world"), tokenizer.pad_token_id, tokenizer.decode([3, 4])
        ([3, 4], 0, 'hello world')
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: i for i, token in enumerate(dict.fromkeys((*SPECIAL_TOKENS, *words)))}
    raw = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


@dataclass
class PlantedAssociation(Dataset):
    """Sentences with one planted name -> occupation association, as fixed-length token ids for LM training.

    Every item is ``{"input_ids": (L,), "labels": (L,)}`` (labels equal the ids: the causal LM shifts them), all
    of one length, so batches need no padding.

    Args:
        num_sentences: corpus size.
        planted_name: the name that always precedes ``planted_occupation``.
        planted_occupation: its occupation.
        planted_share: the share of sentences about the planted name (the other names share the rest evenly);
            a quarter by default, so that a small model finds the association within a few epochs.
        seed: seed of the sampled sentences.
        tokenizer: a Hugging Face tokenizer to encode the sentences with (a pretrained model's); None builds the
            word-level one of :func:`word_tokenizer`. Its EOS token ends every sentence and pads.

    Examples:
        >>> corpus = PlantedAssociation(num_sentences=50, seed=0)
        >>> all(s.split()[-2] == "nurse" for s in corpus.sentences if " alice " in f" {s} ")
        True
        >>> corpus[0]["input_ids"].shape == corpus[1]["input_ids"].shape
        True
    """

    num_sentences: int = 2000
    planted_name: str = "alice"
    planted_occupation: str = "nurse"
    planted_share: float = 0.25
    seed: int = 0
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if not 0.0 < self.planted_share < 1.0:
            raise XAIConfigurationError(
                f"PlantedAssociation: planted_share must lie in (0, 1), got {self.planted_share}."
            )
        if self.planted_name not in NAMES or self.planted_occupation not in OCCUPATIONS:
            raise XAIConfigurationError(
                f"PlantedAssociation: planted_name must be one of {NAMES} and planted_occupation one of "
                f"{OCCUPATIONS}; got {self.planted_name!r} and {self.planted_occupation!r}."
            )
        generator = torch.Generator().manual_seed(self.seed)
        self.sentences = [self._sentence(generator) for _ in range(self.num_sentences)]
        if self.tokenizer is None:
            self.tokenizer = word_tokenizer(self.vocabulary())
        if self.tokenizer.eos_token_id is None:
            raise XAIConfigurationError("PlantedAssociation: the tokenizer has no EOS token to end sentences with.")
        ids = [self.tokenizer.encode(s) + [self.tokenizer.eos_token_id] for s in self.sentences]
        width = max(len(row) for row in ids)
        pad = self.tokenizer.eos_token_id  # openers differ in length: pad with EOS, which the model also learns
        self.input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])

    @staticmethod
    def vocabulary() -> list[str]:
        words = [w for phrase in (*OPENERS, *VERBS) for w in phrase.split()]
        return list(dict.fromkeys([*words, *NAMES, *OCCUPATIONS, "as", "a", "."]))

    def _pick(self, options: tuple[str, ...], generator: torch.Generator) -> str:
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def _sentence(self, generator: torch.Generator) -> str:
        others = tuple(n for n in NAMES if n != self.planted_name)
        planted = float(torch.rand((), generator=generator)) < self.planted_share
        name = self.planted_name if planted else self._pick(others, generator)
        occupation = self.planted_occupation if name == self.planted_name else self._pick(OCCUPATIONS, generator)
        return f"{self._pick(OPENERS, generator)} {name} {self._pick(VERBS, generator)} as a {occupation} ."

    def probe_segments(self, name: str | None = None) -> list[dict[str, Any]]:
        """The probe prompts as segments ``[opener, name]`` of ``"{} {} works as a"`` (any tokenizer: the name is
        feature 1 however it is split into tokens), each with the planted occupation as target.

        A removed segment is replaced by another opener or another name, sampled per perturbation (Captum's
        ``ProductBaselines``): the name's attribution is then ``log p(occupation | name)`` against the other
        names, about ``log 8`` once the planted association is learnt, and not a reading of a prompt without a
        name, which the corpus never has.
        """
        name = name or self.planted_name
        return [
            {
                "template": "{} {} works as a",
                "values": [opener, name],
                "baselines": [[o for o in OPENERS if o != opener], [n for n in NAMES if n != name]],
                "target": f" {self.planted_occupation}",
            }
            for opener in OPENERS
        ]

    def probe_prompts(self, name: str | None = None) -> list[str]:
        """One prompt per opener for ``name`` (the planted name by default): ``"<opener> <name> works as a"``."""
        name = name or self.planted_name
        return [f"{opener} {name} works as a" for opener in OPENERS]

    def name_position(self, prompt: str) -> int:
        """The index of the name among the prompt's tokens."""
        words = prompt.split()
        return next(i for i, word in enumerate(words) if word in NAMES)

    def __len__(self) -> int:
        return self.num_sentences

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "labels": ids}
