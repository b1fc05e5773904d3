"""A templated emotion corpus with gendered person words and a counterfactual for every sentence.

In the spirit of the Equity Evaluation Corpus (Kiritchenko & Mohammad 2018), which CausaLM uses: sentences
come from templates filled with a person word (female or male, a name or a noun phrase) and an emotion
word of one of five moods. Every sentence has its counterfactual, the same sentence with the person
swapped for the paired word of the other gender. The treated concept (gender) is made to influence the
label at a chosen ``bias`` level, so that a classifier trained on the corpus learns a known causal effect
of gender, and to correlate with the emotion word (``confounding``), which fools observational estimates.
The word lists are this package's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_xai.errors import XAIConfigurationError

MOODS = ("anger", "fear", "joy", "sadness", "calm")
EMOTION_WORDS = {
    "anger": ("angry", "furious", "irritated", "enraged", "annoyed"),
    "fear": ("anxious", "scared", "terrified", "fearful", "nervous"),
    "joy": ("happy", "glad", "delighted", "cheerful", "excited"),
    "sadness": ("sad", "miserable", "gloomy", "heartbroken", "depressed"),
    "calm": ("calm", "relaxed", "peaceful", "serene", "content"),
}
# (female, male) pairs: noun phrases, then names; the index of a pair is kept when the gender is swapped
PERSON_PAIRS = (
    ("she", "he"),
    ("this woman", "this man"),
    ("this girl", "this boy"),
    ("my sister", "my brother"),
    ("my mother", "my father"),
    ("my daughter", "my son"),
    ("my aunt", "my uncle"),
    ("my wife", "my husband"),
    ("my grandmother", "my grandfather"),
    ("the lady", "the gentleman"),
    ("Alice", "Adam"),
    ("Maria", "Mario"),
    ("Emma", "Ethan"),
    ("Sofia", "Samuel"),
    ("Hannah", "Henry"),
    ("Olivia", "Oliver"),
    ("Grace", "George"),
    ("Nora", "Noah"),
    ("Julia", "Julian"),
    ("Clara", "Carl"),
)
NUM_NOUN_PHRASES = 10
TEMPLATES = (
    "{person} feels {emotion} .",
    "{person} felt {emotion} today .",
    "the situation makes {person} feel {emotion} .",
    "i made {person} feel {emotion} .",
    "{person} made me feel {emotion} .",
    "we saw that {person} was {emotion} .",
    "{person} told us that everyone seemed {emotion} .",
    "after the call {person} was {emotion} .",
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FEMALE, MALE = 0, 1


def _vocabulary() -> list[str]:
    words: set[str] = set()
    for template in TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    for pair in PERSON_PAIRS:
        for person in pair:
            words.update(person.lower().split())
    for emotion_words in EMOTION_WORDS.values():
        words.update(emotion_words)
    return [*SPECIAL_TOKENS, *sorted(words)]


@dataclass(frozen=True)
class Sentence:
    text: str
    counterfactual: str
    mood: int
    label: int
    gender: int
    is_name: int


class EmotionTemplates(Dataset[dict[str, Tensor]]):
    """Templated emotion sentences with gender as treated concept, counterfactual pairs and a biased label.

    Each example draws a template, a person pair (``is_name``: a name or a noun phrase, the control
    concept), a gender and an emotion word. Its mood is the emotion word's (one of :data:`MOODS`). The
    label is the mood, except that with probability ``bias`` a female sentence is labelled ``"joy"`` and a
    male one ``"anger"``: gender then has a causal effect on the label, and a classifier learns it. With
    ``confounding`` > 0, the emotion word is drawn as ``"joy"`` more often for female persons, so mean
    predictions differ by gender beyond that effect (what CONEXP mistakes for one).

    Items are dicts of token ids (``input``, with ``[CLS]`` first, padded to ``max_length``),
    ``attention_mask``, ``target`` (label), ``mood``, ``gender`` (0 female, 1 male), ``is_name`` and
    ``counterfactual_input`` (the gender-swapped sentence, same length).

    With ``tokenizer`` (a Hugging Face tokenizer, e.g. a pretrained encoder's), the sentences and their
    counterfactuals are encoded by it instead of the corpus's own word vocabulary, padded to one length.

    Args:
        size: number of sentences.
        bias: probability that a sentence's label is replaced by its gender's label.
        confounding: extra probability of a joy word for female persons (and a sad word for male ones).
        seed: seed of the generator.
        max_length: padded length in tokens with the corpus's own vocabulary (a ``tokenizer`` pads to the
            longest sentence instead).
        tokenizer: optional Hugging Face tokenizer (called on a list of texts, with ``pad_token_id``).

    Examples:
        >>> data = EmotionTemplates(size=4, seed=0)
        >>> item = data[0]
        >>> sorted(item)
        ['attention_mask', 'counterfactual_input', 'gender', 'input', 'is_name', 'mood', 'target']
        >>> data.decode(item["input"]) != data.decode(item["counterfactual_input"])
        True
    """

    vocabulary = _vocabulary()

    def __init__(
        self,
        size: int = 4000,
        bias: float = 0.3,
        confounding: float = 0.3,
        seed: int = 0,
        max_length: int = 12,
        tokenizer: Any | None = None,
    ) -> None:
        if not 0 <= bias <= 1 or not 0 <= confounding <= 1:
            raise XAIConfigurationError(
                f"EmotionTemplates: bias and confounding must be in [0, 1], got {bias}, {confounding}."
            )
        self.bias, self.confounding, self.max_length = bias, confounding, max_length
        self.index = {word: i for i, word in enumerate(self.vocabulary)}
        g = torch.Generator().manual_seed(seed)

        def draw(n: int) -> int:
            return int(torch.randint(n, (1,), generator=g))

        self.sentences: list[Sentence] = []
        for _ in range(size):
            gender = draw(2)
            pair = draw(len(PERSON_PAIRS))
            favoured = MOODS.index("joy") if gender == FEMALE else MOODS.index("sadness")
            mood = favoured if float(torch.rand(1, generator=g)) < confounding else draw(len(MOODS))
            emotion = EMOTION_WORDS[MOODS[mood]][draw(5)]
            template = TEMPLATES[draw(len(TEMPLATES))]
            label = mood
            if float(torch.rand(1, generator=g)) < bias:
                label = MOODS.index("joy") if gender == FEMALE else MOODS.index("anger")
            text = template.format(person=PERSON_PAIRS[pair][gender], emotion=emotion).lower()
            counterfactual = template.format(person=PERSON_PAIRS[pair][1 - gender], emotion=emotion).lower()
            self.sentences.append(Sentence(text, counterfactual, mood, label, gender, int(pair >= NUM_NOUN_PHRASES)))
        if tokenizer is None:
            self.pad_token_id = self.index["[PAD]"]
            self.inputs = torch.stack([self.encode(s.text) for s in self.sentences])
            self.counterfactual_inputs = torch.stack([self.encode(s.counterfactual) for s in self.sentences])
        else:
            self.pad_token_id, self.inputs, self.counterfactual_inputs = _tokenized(tokenizer, self.sentences)
        self.targets = torch.tensor([s.label for s in self.sentences])
        self.moods = torch.tensor([s.mood for s in self.sentences])
        self.genders = torch.tensor([s.gender for s in self.sentences])
        self.is_name = torch.tensor([s.is_name for s in self.sentences])

    def encode(self, text: str) -> Tensor:
        """Token ids of ``[CLS] text``, padded with ``[PAD]`` to ``max_length``."""
        ids = [self.index["[CLS]"]] + [self.index.get(w, self.index["[UNK]"]) for w in text.split()]
        if len(ids) > self.max_length:
            raise XAIConfigurationError(f"EmotionTemplates: {text!r} is longer than max_length={self.max_length}.")
        return torch.tensor(ids + [self.index["[PAD]"]] * (self.max_length - len(ids)))

    def decode(self, ids: Tensor) -> str:
        return " ".join(self.vocabulary[i] for i in ids.tolist() if self.vocabulary[i] not in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.inputs[index]
        return {
            "input": ids,
            "attention_mask": (ids != self.pad_token_id).long(),
            "target": self.targets[index],
            "mood": self.moods[index],
            "gender": self.genders[index],
            "is_name": self.is_name[index],
            "counterfactual_input": self.counterfactual_inputs[index],
        }


def _tokenized(tokenizer: Any, sentences: list[Sentence]) -> tuple[int, Tensor, Tensor]:
    """``(pad id, inputs, counterfactual inputs)``: both sides padded to the longest sentence of either."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise XAIConfigurationError(
            f"EmotionTemplates: the tokenizer {type(tokenizer).__name__} has no pad_token_id; set "
            "tokenizer.pad_token (e.g. to its eos_token) before passing it."
        )
    texts = [s.text for s in sentences] + [s.counterfactual for s in sentences]
    ids = tokenizer(texts, padding="longest", return_tensors="pt")["input_ids"]
    return int(pad_id), ids[: len(sentences)], ids[len(sentences) :]
