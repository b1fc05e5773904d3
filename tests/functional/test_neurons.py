"""TX-Ray kernels: credit rules against brute force, planted neurons, Hellinger's identities, lengths, redundancy,
the positions of every supported layer kind, scores and inline pruning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_xai.functional.neurons import (
    dead_neurons,
    feature_distributions,
    filter_redundancy,
    hellinger_distance,
    layer_positions,
    length_shift,
    lowest_scored,
    neuron_feature_mass,
    neuron_length,
    neuron_scores,
    prune_neurons,
    top_features,
)
from tests.helpers import tiny_bert_config


def _brute_force(activations, features, num_features, mode, k, valid):
    batch, positions, neurons = activations.shape
    mass = torch.zeros(neurons, num_features)
    count = torch.zeros(neurons, num_features)
    for b in range(batch):
        if mode == "max":
            for p in range(positions):
                value, neuron = activations[b, p].max(0)
                if valid[b, p] and value > 0:
                    mass[neuron, features[b, p]] += value
                    count[neuron, features[b, p]] += 1
        else:
            for n in range(neurons):
                scores = [(float(activations[b, p, n]), p) for p in range(positions) if valid[b, p]]
                for value, p in sorted(scores, key=lambda item: (-item[0], item[1]))[:k]:
                    if value > 0:
                        mass[n, features[b, p]] += value
                        count[n, features[b, p]] += 1
    return mass, count


@pytest.mark.parametrize("mode, k", [("max", 1), ("topk", 1), ("topk", 3)])
def test_credit_equals_a_loop_over_positions(mode, k):
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(5, 7, 4, generator=generator)
    features = torch.randint(0, 6, (5, 7), generator=generator)
    valid = torch.rand(5, 7, generator=generator) > 0.2
    counts = neuron_feature_mass(activations, features, 6, mode, k, valid)
    mass, count = _brute_force(activations, features, 6, mode, k, valid)
    torch.testing.assert_close(counts.mass, mass)
    torch.testing.assert_close(counts.count, count)


@pytest.mark.parametrize("mode", ["max", "topk"])
def test_planted_neurons_fire_on_their_token_only(mode):
    """Neuron i of a one-hot embedding fires only on token i: its distribution is the point mass on token i."""
    vocab = 6
    embedding = nn.Embedding(vocab, vocab)
    embedding.weight.data = torch.diag(torch.arange(1.0, vocab + 1))
    ids = torch.tensor([[1, 2, 3, 1], [2, 4, 0, 0]])
    activations = layer_positions(embedding, embedding(ids))
    counts = neuron_feature_mass(activations, ids, vocab, mode, valid=ids != 0)
    present = torch.tensor([False, True, True, True, True, False])
    torch.testing.assert_close(feature_distributions(counts.mass), torch.diag(present.float()))
    assert dead_neurons(counts.mass).tolist() == (~present).tolist()
    # max-1 credits every position; top-1 one position per sample (token 1 twice in the first sentence: once)
    twice = 2.0 if mode == "max" else 1.0
    assert counts.count.diagonal().tolist() == [0.0, twice, 2.0, 1.0, 1.0, 0.0]
    assert counts.mass.diagonal().tolist() == [0.0, 2 * twice, 6.0, 4.0, 5.0, 0.0]
    assert neuron_length(counts.mass).tolist() == present.long().tolist()
    assert (filter_redundancy(counts.mass)[present][:, present] == torch.eye(4)).all()


def test_label_features_are_broadcast_and_out_of_range_features_are_not_credited():
    activations = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.5]]])
    counts = neuron_feature_mass(activations, torch.tensor([1, 0]), num_features=2)
    assert counts.mass.tolist() == [[3.0, 1.0], [0.5, 2.0]]
    counts = neuron_feature_mass(activations, torch.tensor([[1, 7], [-1, 0]]), num_features=2)
    assert counts.mass.tolist() == [[0.0, 1.0], [0.5, 0.0]]


def test_hellinger_is_zero_for_equal_one_for_disjoint_and_matches_the_bhattacharyya_identity():
    generator = torch.Generator().manual_seed(1)
    p = torch.rand(8, 10, generator=generator) * (torch.rand(8, 10, generator=generator) > 0.4)
    q = torch.rand(8, 10, generator=generator) * (torch.rand(8, 10, generator=generator) > 0.4)
    p[0], q[0] = torch.tensor([1.0] + [0.0] * 9), torch.tensor([0.0, 1.0] + [0.0] * 8)
    distance = hellinger_distance(p, q)
    assert distance[0] == 1.0
    torch.testing.assert_close(hellinger_distance(p, 3 * p), torch.zeros(8))
    coefficient = (feature_distributions(p) * feature_distributions(q)).sqrt().sum(-1)
    torch.testing.assert_close(distance**2, (1 - coefficient).clamp_min(0), atol=1e-6, rtol=1e-5)
    # p = (1, 0), q = (1/2, 1/2): H^2 = 1 - sqrt(1/2)
    value = hellinger_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
    assert value.item() == pytest.approx(math.sqrt(1 - math.sqrt(0.5)), abs=1e-6)


def test_hellinger_of_a_dead_neuron_is_undefined():
    distance = hellinger_distance(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert distance[0] == 0 and math.isnan(distance[1])


def test_lengths_shift_and_redundancy_against_sets():
    generator = torch.Generator().manual_seed(2)
    now = torch.rand(6, 12, generator=generator) * (torch.rand(6, 12, generator=generator) > 0.6)
    before = torch.rand(6, 12, generator=generator) * (torch.rand(6, 12, generator=generator) > 0.3)
    now[5] = 0
    supports = [set(torch.nonzero(row).flatten().tolist()) for row in now]
    before_supports = [set(torch.nonzero(row).flatten().tolist()) for row in before]
    assert neuron_length(now).tolist() == [len(s) for s in supports]
    shift = length_shift(now, before)
    assert shift[:5].tolist() == [len(a) - len(b) for a, b in zip(supports[:5], before_supports[:5])]
    assert math.isnan(shift[5])
    overlap = filter_redundancy(now)
    for i in range(5):
        for j in range(5):
            expected = len(supports[i] & supports[j]) / len(supports[i] | supports[j])
            assert overlap[i, j].item() == pytest.approx(expected)
    assert math.isnan(overlap[5, 0]) and math.isnan(overlap[5, 5])


def test_top_features_rank_by_share():
    ids, shares = top_features(torch.tensor([[1.0, 5.0, 4.0, 0.0]]), k=2)
    assert ids.tolist() == [[1, 2]] and shares[0].tolist() == pytest.approx([0.5, 0.4])


def _bert_layer():
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config()
    return transformers.BertModel(config).encoder.layer[0], config.hidden_size


LAYER_CASES = {
    # name -> (module, input, expected (batch, positions, neurons))
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 7), (2, 7, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 6, 5), (2, 12, 4)),
    "lstm": (lambda: nn.LSTM(3, 4), lambda: torch.randn(7, 2, 3), (2, 7, 4)),
    "lstm_batch_first_bidirectional": (
        lambda: nn.LSTM(3, 4, batch_first=True, bidirectional=True),
        lambda: torch.randn(2, 7, 3),
        (2, 7, 8),
    ),
    "linear_pooled": (lambda: nn.Linear(3, 6), lambda: torch.randn(2, 3), (2, 1, 6)),
    "linear_tokens": (lambda: nn.Linear(3, 6), lambda: torch.randn(2, 5, 3), (2, 5, 6)),
}


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_positions_put_neurons_last(name):
    make_module, make_input, shape = LAYER_CASES[name]
    module, inputs = make_module(), make_input()
    positions = layer_positions(module, module(inputs))
    assert tuple(positions.shape) == shape
    if name == "conv1d":  # position t of sample b is the channel vector out[b, :, t]
        output = module(inputs)
        torch.testing.assert_close(positions[1, 4], output[1, :, 4])
    if name == "lstm":  # batch_first=False: (T, B, H) becomes (B, T, H)
        output, _ = module(inputs)
        torch.testing.assert_close(positions[1, 3], output[3, 1])


def test_layer_positions_of_a_packed_lstm_and_a_hugging_face_encoder_layer():
    lstm = nn.LSTM(3, 4, batch_first=True)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    assert tuple(layer_positions(lstm, lstm(packed)).shape) == (2, 5, 4)
    layer, hidden = _bert_layer()
    output = layer(torch.randn(2, 6, hidden))
    assert tuple(layer_positions(layer, output).shape) == (2, 6, hidden)


def test_scores_and_lowest_scored():
    mass = torch.tensor([[3.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert neuron_scores(mass, score="mass").tolist() == pytest.approx([0.8, 0.0, 0.2])
    reference = torch.tensor([[3.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    # unchanged: 0; dead now: 0; alive now but dead at the reference: 1 (learnt in training)
    assert neuron_scores(mass, reference, "transfer").tolist() == [0.0, 0.0, 1.0]
    assert lowest_scored(torch.tensor([0.3, 0.1, 0.2, 0.1]), 0.5).tolist() == [1, 3]
    assert lowest_scored(torch.tensor([0.3, 0.1, 0.2, 0.1]), 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="transfer"):
        neuron_scores(mass, score="transfer")


def test_prune_neurons_zeroes_channels_and_minus_infinity_hides_them_from_max_pooling():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 4, 3, padding=1)
    inputs = torch.randn(3, 2, 8)
    before = conv(inputs)
    handle = prune_neurons(conv, [0, 2])
    after = conv(inputs)
    assert (after[:, [0, 2]] == 0).all() and torch.equal(after[:, [1, 3]], before[:, [1, 3]])
    handle.remove()
    assert torch.equal(conv(inputs), before)
    handle = prune_neurons(conv, [1], fill=-math.inf)
    pooled = nn.functional.max_pool1d(conv(inputs), 8)
    assert torch.isinf(pooled[:, 1]).all() and torch.isfinite(pooled[:, [0, 2, 3]]).all()
    handle.remove()
    lstm = nn.LSTM(2, 3, batch_first=True)
    prune_neurons(lstm, [2])
    output, (hidden, _) = lstm(torch.randn(2, 4, 2))
    assert (output[..., 2] == 0).all() and (hidden[..., 2] != 0).all()  # the recurrence itself is untouched
