"""The Stanford Sentiment Treebank, read from its PTB tree files, and CDEP's three shortcut variants.

CDEP (Rieger et al., ICML 2020, section 4.3) plants a shortcut into SST's training split and leaves dev and test
clean, so a model that learns the shortcut loses accuracy there:

* ``"decoy"``: every training sentence gets one token at a uniformly random position (before one of its words),
  ``text`` in positive and ``video`` in negative sentences.
* ``"articles"``: every labelled training phrase (subtree) has each ``a`` and ``the`` replaced by the placeholder
  ``that``; the first ``that`` then becomes ``a`` in positive and ``the`` in negative phrases. Dev and test keep
  the sentences that contain ``a`` or ``the``.
* ``"gender"``: the same with ``he`` / ``she`` and the placeholder ``who``: ``she`` in positive, ``he`` in negative
  phrases. Dev and test keep the sentences with ``he`` or ``she`` (55 test sentences).

The mask of a sample marks the token the construction put there (``[(position, position + 1)]``); samples without
one have ``None``. With ``shortcut=False`` the same sentences and phrases come unchanged: the shortcut-free model
that bounds what a penalty can recover. Tokens are lower-cased leaves of the trees; labels are 0 (negative: tree
labels 0-1) and 1 (positive: 3-4), neutral phrases (2) are dropped. No data ships with the package: pass the
directory of ``train.txt``, ``dev.txt`` and ``test.txt``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Sampler

from lightning_xai.errors import XAIConfigurationError

Variant = Literal["decoy", "articles", "gender"]
Split = Literal["train", "dev", "test"]

#: the shortcut word of each class (negative, positive) and the placeholder of the substitution variants
DECOY_WORDS = ("video", "text")
SUBSTITUTIONS: dict[str, tuple[tuple[str, str], str]] = {
    # variant: ((negative word, positive word), placeholder)
    "articles": (("the", "a"), "that"),
    "gender": (("he", "she"), "who"),
}
PAD, UNK = "<pad>", "<unk>"


@dataclass(frozen=True)
class _Tree:
    label: int
    tokens: tuple[str, ...]
    children: tuple[_Tree, ...]

    def subtrees(self) -> Iterator[_Tree]:
        yield self
        for child in self.children:
            yield from child.subtrees()


def parse_tree(line: str) -> _Tree:
    """One PTB-format sentiment tree, ``(3 (2 It) (4 (4 works) (2 .)))``, with its tokens lower-cased.

    Examples:
        >>> tree = parse_tree("(3 (2 It) (4 (4 works) (2 .)))")
        >>> tree.label, tree.tokens, [t.tokens for t in tree.subtrees()][1:3]
        (3, ('it', 'works', '.'), [('it',), ('works', '.')])
    """
    position = 0
    text = line.strip()

    def node() -> _Tree:
        nonlocal position
        if text[position] != "(":
            raise ValueError(f"expected '(' at {position} of {text[:80]!r}")
        position += 1
        end = text.index(" ", position)
        label = int(text[position:end])
        position = end + 1
        if text[position] == "(":
            children = []
            while text[position] == "(":
                children.append(node())
                while text[position] == " ":
                    position += 1
            position += 1  # ")"
            tokens = tuple(token for child in children for token in child.tokens)
            return _Tree(label, tokens, tuple(children))
        end = text.index(")", position)
        word = text[position:end].lower()
        position = end + 1
        return _Tree(label, (word,), ())

    return node()


def _binary(label: int) -> int | None:
    return 0 if label < 2 else 1 if label > 2 else None


def read_sst(path: str | Path, subtrees: bool = False) -> list[tuple[list[str], int]]:
    """``(tokens, label)`` of every non-neutral sentence of a tree file (or of every labelled phrase).

    Args:
        path: a PTB tree file (``train.txt``).
        subtrees: every labelled subtree instead of the sentences (CDEP's training set of the substitution
            variants).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"read_sst: no file at {path}; pass the directory of SST's PTB trees (train.txt, dev.txt, test.txt)."
        )
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        tree = parse_tree(line)
        for node in tree.subtrees() if subtrees else (tree,):
            label = _binary(node.label)
            if label is not None:
                examples.append((list(node.tokens), label))
    return examples


class Vocabulary:
    """Token ids: ``<pad>`` is 0 and ``<unk>`` is 1, then the tokens of the training split by frequency.

    Examples:
        >>> vocabulary = Vocabulary([["a", "film"], ["a", "plot"]])
        >>> vocabulary.encode(["a", "film", "ghost"]), vocabulary.decode([2, 1])
        ([2, 3, 1], ['a', '<unk>'])
    """

    def __init__(self, sentences: Sequence[Sequence[str]], extra: Sequence[str] = ()) -> None:
        counts = Counter(token for sentence in sentences for token in sentence)
        words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
        self.itos = [PAD, UNK, *dict.fromkeys([*words, *extra])]
        self.stoi = {word: index for index, word in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(token, 1) for token in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]


def _decoy(examples, rng: random.Random):
    planted = []
    for tokens, label in examples:
        position = rng.randrange(len(tokens))
        planted.append(([*tokens[:position], DECOY_WORDS[label], *tokens[position:]], label, position))
    return planted


def _substitute(examples, words: tuple[str, str], placeholder: str):
    planted = []
    for tokens, label in examples:
        tokens = [placeholder if token in words else token for token in tokens]
        position = tokens.index(placeholder) if placeholder in tokens else None
        if position is not None:
            tokens[position] = words[label]
        planted.append((tokens, label, position))
    return planted


class SSTShortcut(Dataset[dict[str, Any]]):
    """One split of SST with one of CDEP's shortcuts planted into its training split.

    Items are dicts ``{"input_ids": (T,) long, "labels": () long, "mask": [(p, p + 1)] or None}``; the mask is the
    planted token (training split only). Batch them with :meth:`collate`, which pads on the left (a classifier
    that reads the last LSTM state then reads the last word) and shifts the spans along.

    Args:
        root: the directory of ``train.txt``, ``dev.txt`` and ``test.txt`` (PTB trees).
        split: ``"train"``, ``"dev"`` or ``"test"``.
        variant: ``"decoy"``, ``"articles"`` or ``"gender"`` (see the module docs).
        shortcut: plant the shortcut (training split); ``False`` gives the same sentences or phrases unchanged.
        vocabulary: the training split's :attr:`vocabulary`, for dev and test; built from this split if omitted.
        seed: seed of the decoy positions.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for split in ("train", "dev", "test"):
        ...     _ = (root / f"{split}.txt").write_text("(4 (2 A) (4 good) (2 film))\\n(0 (2 The) (0 bad) (2 plot))\\n")
        >>> train = SSTShortcut(root, "train", "articles")
        >>> [" ".join(train.vocabulary.decode(item["input_ids"].tolist())) for item in train]
        ['a good film', 'good', 'the bad plot', 'bad']
        >>> train[0]["mask"], train[1]["mask"], len(SSTShortcut(root, "test", "articles", vocabulary=train.vocabulary))
        ([(0, 1)], None, 2)
    """

    def __init__(
        self,
        root: str | Path,
        split: Split = "train",
        variant: Variant = "decoy",
        shortcut: bool = True,
        vocabulary: Vocabulary | None = None,
        seed: int = 0,
    ) -> None:
        if variant not in ("decoy", "articles", "gender"):
            raise XAIConfigurationError(
                f"SSTShortcut: variant must be 'decoy', 'articles' or 'gender', got {variant!r}."
            )
        if split not in ("train", "dev", "test"):
            raise XAIConfigurationError(f"SSTShortcut: split must be 'train', 'dev' or 'test', got {split!r}.")
        self.split, self.variant = split, variant
        train = split == "train"
        examples = read_sst(Path(root) / f"{split}.txt", subtrees=train and variant != "decoy")
        if variant in SUBSTITUTIONS:
            words, placeholder = SUBSTITUTIONS[variant]
            if train:
                planted = (
                    _substitute(examples, words, placeholder)
                    if shortcut
                    else [(tokens, label, None) for tokens, label in examples]
                )
            else:  # dev and test: the sentences the shortcut word could matter in, unchanged
                planted = [(tokens, label, None) for tokens, label in examples if set(words) & set(tokens)]
        elif train and shortcut:
            planted = _decoy(examples, random.Random(seed))
        else:
            planted = [(tokens, label, None) for tokens, label in examples]
        self.examples = planted
        self.vocabulary = vocabulary or Vocabulary([tokens for tokens, _, _ in planted], extra=self.shortcut_words)

    @property
    def shortcut_words(self) -> tuple[str, str]:
        """The (negative, positive) words the shortcut uses."""
        return DECOY_WORDS if self.variant == "decoy" else SUBSTITUTIONS[self.variant][0]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tokens, label, position = self.examples[index]
        return {
            "input_ids": torch.tensor(self.vocabulary.encode(tokens), dtype=torch.long),
            "labels": torch.tensor(label, dtype=torch.long),
            "mask": None if position is None else [(position, position + 1)],
        }

    @staticmethod
    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pads ``input_ids`` on the left with ``<pad>`` (id 0), shifts the mask spans, adds ``lengths``."""
        length = max(int(sample["input_ids"].shape[0]) for sample in samples)
        ids = torch.zeros(len(samples), length, dtype=torch.long)
        spans: list[list[tuple[int, int]] | None] = []
        for row, sample in enumerate(samples):
            n = int(sample["input_ids"].shape[0])
            ids[row, length - n :] = sample["input_ids"]
            mask = sample["mask"]
            spans.append(None if mask is None else [(start + length - n, end + length - n) for start, end in mask])
        return {
            "input_ids": ids,
            "labels": torch.stack([sample["labels"] for sample in samples]),
            "mask": spans,
            "lengths": torch.tensor([int(sample["input_ids"].shape[0]) for sample in samples]),
        }

    def shortcut_swapped(self) -> SSTShortcut:
        """A copy whose shortcut words change class (``text`` <-> ``video``): a model that reads them falls."""
        negative, positive = self.shortcut_words
        swap = {negative: positive, positive: negative}
        copy = object.__new__(SSTShortcut)
        copy.__dict__.update(self.__dict__)
        copy.examples = [
            (
                [swap.get(token, token) if i == position else token for i, token in enumerate(tokens)],
                label,
                position,
            )
            for tokens, label, position in self.examples
        ]
        return copy


def length_buckets(dataset: SSTShortcut, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of indices of similar lengths (less padding), in a shuffled order seeded by ``seed``.

    Examples:
        >>> class Lengths:
        ...     examples = [(["w"] * n, 0, None) for n in (5, 1, 4, 2, 3, 6)]
        >>> sorted(len(b) for b in length_buckets(Lengths(), 2))
        [2, 2, 2]
    """
    rng = random.Random(seed)
    order = sorted(range(len(dataset.examples)), key=lambda i: (len(dataset.examples[i][0]), rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


class LengthBucketSampler(Sampler[list[int]]):
    """A batch sampler of :func:`length_buckets`, reshuffled every epoch (Lightning calls :meth:`set_epoch`).

    Examples:
        >>> class Lengths:
        ...     examples = [(["w"] * n, 0, None) for n in (5, 1, 4, 2, 3, 6)]
        >>> sampler = LengthBucketSampler(Lengths(), 2, seed=0)
        >>> first = list(sampler); sampler.set_epoch(1)
        >>> len(sampler), sorted(map(sorted, first)) == sorted(map(sorted, sampler))
        (3, True)
    """

    def __init__(self, dataset: SSTShortcut, batch_size: int, seed: int = 0) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.dataset.examples) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # seeds apart by a large prime so that (seed, epoch) pairs do not repeat across runs with nearby seeds
        return iter(length_buckets(self.dataset, self.batch_size, self.seed + 1_000_003 * self.epoch))
