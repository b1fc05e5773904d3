"""SST from PTB trees and CDEP's three shortcut variants (decoy words, articles, gender), with span masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_xai.datasets.sst import SSTShortcut, length_buckets, parse_tree, read_sst

TREES = [
    "(4 (2 (2 A) (2 film)) (4 (2 that) (4 (4 shines) (2 .))))",
    "(1 (2 The) (1 (2 plot) (1 (1 drags) (2 .))))",
    "(2 (2 It) (2 exists))",  # neutral: dropped
    "(3 (2 She) (3 (3 sings) (2 (2 and) (2 (2 he) (2 plays)))))",
    "(0 (2 He) (0 (0 fails) (2 (2 the) (2 test))))",
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.txt").write_text("\n".join(TREES) + "\n")
    return tmp_path


def test_trees_parse_to_lowercase_tokens_and_binary_labels(root):
    tree = parse_tree(TREES[0])
    assert tree.tokens == ("a", "film", "that", "shines", ".") and tree.label == 4
    sentences = read_sst(root / "train.txt")
    assert [label for _, label in sentences] == [1, 0, 1, 0]  # 0-1 negative, 3-4 positive, 2 dropped
    phrases = read_sst(root / "train.txt", subtrees=True)
    assert (["shines"], 1) in phrases and (["drags", "."], 0) in phrases
    assert not any(tokens == ["film"] for tokens, _ in phrases)  # a neutral phrase


def test_decoy_words_go_into_every_training_sentence_and_nowhere_else(root):
    train = SSTShortcut(root, "train", "decoy", seed=3)
    for (tokens, label, position), (original, _) in zip(train.examples, read_sst(root / "train.txt")):
        assert tokens[position] == ("text" if label == 1 else "video")
        assert tokens[:position] + tokens[position + 1 :] == original and position < len(original)
        assert train[train.examples.index((tokens, label, position))]["mask"] == [(position, position + 1)]
    test = SSTShortcut(root, "test", "decoy", vocabulary=train.vocabulary)
    assert [tokens for tokens, _, _ in test.examples] == [tokens for tokens, _ in read_sst(root / "test.txt")]
    assert all(test[i]["mask"] is None for i in range(len(test)))
    swapped = train.shortcut_swapped()
    assert [t[p] for t, _, p in swapped.examples] == ["video" if y == 1 else "text" for _, y, _ in train.examples]


@pytest.mark.parametrize(
    ("variant", "negative", "positive", "sentence", "held_out"),
    [("articles", "the", "a", ["a", "film"], 3), ("gender", "he", "she", ["she", "sings"], 2)],
)
def test_substitution_variants_replace_the_first_placeholder_by_the_class_word(
    root, variant, negative, positive, sentence, held_out
):
    train = SSTShortcut(root, "train", variant)
    assert len(train) == len(read_sst(root / "train.txt", subtrees=True))
    for tokens, label, position in train.examples:
        assert negative not in tokens[:position] and positive not in tokens[:position]
        if position is None:
            assert negative not in tokens and positive not in tokens
            continue
        assert tokens[position] == (positive if label == 1 else negative)
        assert not {negative, positive} & set(tokens[position + 1 :])  # later ones stay placeholders
    first = next(e for e in train.examples if e[0][:2] == sentence)
    assert first[2] == 0
    # dev and test keep the sentences with one of the two words, unchanged
    test = SSTShortcut(root, "test", variant, vocabulary=train.vocabulary)
    assert all({negative, positive} & set(tokens) for tokens, _, _ in test.examples) and len(test) == held_out
    clean = SSTShortcut(root, "train", variant, shortcut=False)
    assert [t for t, _, _ in clean.examples] == [t for t, _ in read_sst(root / "train.txt", subtrees=True)]


def test_collate_pads_on_the_left_and_shifts_the_spans(root):
    train = SSTShortcut(root, "train", "decoy", seed=0)
    batch = SSTShortcut.collate([train[0], train[1]])
    lengths = batch["lengths"].tolist()
    width = max(lengths)
    assert batch["input_ids"].shape == (2, width)
    for row, n in enumerate(lengths):
        assert (batch["input_ids"][row, : width - n] == 0).all()  # <pad> on the left: the last token is a word
        ((start, end),) = batch["mask"][row]
        assert (
            batch["input_ids"][row, start].item()
            == train.vocabulary.stoi[train.shortcut_words[int(batch["labels"][row])]]
        )
    batches = length_buckets(train, 2, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(train)))


def test_missing_files_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.txt, dev.txt, test.txt"):
        SSTShortcut(tmp_path, "train")
    with pytest.raises(Exception, match="variant must be"):
        SSTShortcut(tmp_path, "train", "colour")


SST = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst"


@pytest.mark.skipif(not (SST / "train.txt").is_file(), reason="the SST trees are not on this machine")
def test_the_real_treebank_gives_cdeps_split_sizes():
    assert [len(read_sst(SST / f"{s}.txt")) for s in ("train", "dev", "test")] == [6920, 872, 1821]
    train = SSTShortcut(SST, "train", "gender")
    assert len(SSTShortcut(SST, "test", "gender", vocabulary=train.vocabulary)) == 55
    assert torch.is_tensor(train[0]["input_ids"])
