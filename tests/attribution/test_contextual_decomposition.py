import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai.attribution import contextual_decomposition, register_cd_rule
from lightning_xai.errors import MaskShapeError, UnsupportedLayerError
from lightning_xai.functional.contextual_decomposition import Decomposition


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.skip(x)).flatten(1)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return torch.cat([torch.tanh(self.a(x)), self.b(x), x.new_ones(x.size(0), 1)], dim=1) * 2.0


def _bn(channels, dims):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return bn


IMAGE = (4, 3, 8, 8)
SEQUENCE = (4, 3, 10)
VECTOR = (4, 6)

RULE_CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5)), VECTOR),
    "linear_functional": (lambda: Lambda(lambda x: F.linear(x, torch.ones(2, 6), torch.tensor([0.5, -1.0]))), VECTOR),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1)), SEQUENCE),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)), IMAGE),
    "relu": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU()), VECTOR),
    "leaky_relu": (lambda: nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.2)), VECTOR),
    "elu": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ELU()), VECTOR),
    "gelu": (lambda: nn.Sequential(nn.Linear(6, 5), nn.GELU()), VECTOR),
    "tanh": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh()), VECTOR),
    "sigmoid": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Sigmoid()), VECTOR),
    "softplus": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Softplus()), VECTOR),
    "functional_nonlinearities": (
        lambda: Lambda(lambda x: F.softplus(x) + torch.sigmoid(x) * 2 + F.relu(x, inplace=True)),
        VECTOR,
    ),
    "maxpool1d": (lambda: nn.Sequential(nn.MaxPool1d(3, stride=2, padding=1)), SEQUENCE),
    "maxpool2d_2": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)), IMAGE),
    "maxpool2d_overlapping": (lambda: nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1)), IMAGE),
    "maxpool2d_dilated_ceil": (lambda: nn.Sequential(nn.MaxPool2d(2, stride=3, dilation=2, ceil_mode=True)), IMAGE),
    "max_pool2d_functional": (lambda: Lambda(lambda x: F.max_pool2d(x, 3, 2)), IMAGE),
    "avgpool": (lambda: nn.Sequential(nn.AvgPool2d(2), nn.AvgPool2d(3, stride=1, padding=1)), IMAGE),
    "adaptive_avgpool": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten()), IMAGE),
    "batchnorm2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _bn(4, 2), nn.ReLU()), IMAGE),
    "batchnorm1d": (lambda: nn.Sequential(nn.Linear(6, 5), _bn(5, 1)), VECTOR),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5)), VECTOR),
    "dropout": (lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 5), nn.Dropout(0.3)), VECTOR),
    "flatten_reshape": (lambda: Lambda(lambda x: x.view(x.size(0), -1).reshape(-1, 3, 64).permute(0, 2, 1)), IMAGE),
    "residual": (Residual, IMAGE),
    "concatenation": (Concat, VECTOR),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _random_mask(shape):
    return (torch.rand(shape[0], *shape[2:]) > 0.5).float() if len(shape) > 2 else (torch.rand(shape) > 0.5).float()


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_additivity_and_extreme_masks_for_every_rule(case):
    build, shape = RULE_CASES[case]
    model = build()
    x = torch.randn(shape)
    model.eval()
    expected = model(x.clone())
    relevant, irrelevant = contextual_decomposition(model, x, _random_mask(shape))
    torch.testing.assert_close(relevant + irrelevant, expected, atol=1e-5, rtol=0)
    zero_relevant, _ = contextual_decomposition(model, x, torch.zeros(_random_mask(shape).shape))
    assert zero_relevant.abs().max() < 1e-6  # nothing masked: nothing relevant
    _, full_irrelevant = contextual_decomposition(model, x, torch.ones(_random_mask(shape).shape))
    assert full_irrelevant.abs().max() < 1e-5  # everything masked: nothing irrelevant


def test_linear_model_decomposes_exactly():
    model = nn.Linear(6, 3, bias=False)
    x = torch.randn(5, 6)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    relevant, irrelevant = contextual_decomposition(model, x, mask)
    torch.testing.assert_close(relevant, model(x * mask))
    torch.testing.assert_close(irrelevant, model(x * (1 - mask)))


def test_bias_is_split_in_proportion_to_magnitudes():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        model.bias.fill_(4.0)
    relevant, irrelevant = contextual_decomposition(model, torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 0.0]]))
    assert relevant.item() == pytest.approx(1.0 + 4.0 * 0.25)
    assert irrelevant.item() == pytest.approx(3.0 + 4.0 * 0.75)


def test_relu_is_relevant_first():
    model = nn.ReLU()
    relevant, irrelevant = contextual_decomposition(
        nn.Sequential(model), torch.tensor([[2.0, -2.0]]), torch.tensor([[1.0, 0.0]])
    )
    # x = rel + irrel per unit; unit 0 is all relevant, unit 1 all irrelevant (and clipped).
    assert relevant.tolist() == [[2.0, 0.0]]
    assert irrelevant.tolist() == [[0.0, 0.0]]


def test_max_pool_reads_both_parts_at_the_argmax_of_the_total():
    x = torch.tensor([[[[1.0, 5.0], [2.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    relevant, irrelevant = contextual_decomposition(nn.Sequential(nn.MaxPool2d(2)), x, mask)
    assert relevant.item() == 0.0 and irrelevant.item() == 5.0


def test_whole_cnn_batched_equals_per_sample():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        _bn(8, 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    x = torch.randn(5, 3, 8, 8)
    mask = _random_mask(x.shape)
    relevant, irrelevant = contextual_decomposition(model, x, mask)
    for i in range(5):
        rel_i, irrel_i = contextual_decomposition(model, x[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(rel_i, relevant[i : i + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(irrel_i, irrelevant[i : i + 1], atol=1e-5, rtol=1e-4)


def test_decomposition_is_differentiable_wrt_parameters_finite_differences():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    mask = _random_mask(x.shape).double()
    weight = model[0].weight

    # gradcheck through the fx interpreter: the parameter is read at run time, so swap it per call
    w0 = weight.detach().clone().requires_grad_(True)

    def fn(w):
        original = model[0].weight
        del model[0].weight
        model[0].weight = w
        try:
            return contextual_decomposition(model, x, mask)[0]
        finally:
            del model[0].weight
            model[0].weight = original

    assert torch.autograd.gradcheck(fn, (w0,), eps=1e-6, atol=1e-5)


def test_train_eval_state_is_restored_and_dropout_is_off():
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.9), nn.Linear(5, 2))
    model.train()
    model[2].eval()
    x = torch.randn(3, 6)
    rel_a, irrel_a = contextual_decomposition(model, x, torch.ones(3, 6) * 0.5)
    rel_b, _ = contextual_decomposition(model, x, torch.ones(3, 6) * 0.5)
    torch.testing.assert_close(rel_a, rel_b)  # deterministic: dropout is off during CD
    assert model.training and model[0].training and model[1].training and not model[2].training
    model.eval()
    torch.testing.assert_close(rel_a + irrel_a, model(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- LSTM


def _murdoch_reference(lstm: nn.LSTM, embedded: np.ndarray, start: int, stop: int):
    """Per-sample CD of the final hidden state, following Murdoch et al.'s original numpy code."""

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    def decomp_three(a, b, c, act):
        a_contrib = 0.5 * (act(a + c) - act(c) + act(a + b + c) - act(b + c))
        b_contrib = 0.5 * (act(b + c) - act(c) + act(a + b + c) - act(a + c))
        return a_contrib, b_contrib, act(c)

    def decomp_tanh_two(a, b):
        return 0.5 * (np.tanh(a) + (np.tanh(a + b) - np.tanh(b))), 0.5 * (np.tanh(b) + (np.tanh(a + b) - np.tanh(a)))

    w_ii, w_if, w_ig, w_io = np.split(lstm.weight_ih_l0.detach().double().numpy(), 4, 0)
    w_hi, w_hf, w_hg, w_ho = np.split(lstm.weight_hh_l0.detach().double().numpy(), 4, 0)
    b_i, b_f, b_g, b_o = np.split((lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().double().numpy(), 4)
    T, H = embedded.shape[0], lstm.hidden_size
    relevant, irrelevant = np.zeros((T, H)), np.zeros((T, H))
    relevant_h, irrelevant_h = np.zeros((T, H)), np.zeros((T, H))
    for i in range(T):
        prev_rel_h = relevant_h[i - 1] if i > 0 else np.zeros(H)
        prev_irrel_h = irrelevant_h[i - 1] if i > 0 else np.zeros(H)
        rel_i, rel_g, rel_f, rel_o = w_hi @ prev_rel_h, w_hg @ prev_rel_h, w_hf @ prev_rel_h, w_ho @ prev_rel_h
        irrel_i, irrel_g = w_hi @ prev_irrel_h, w_hg @ prev_irrel_h
        irrel_f, irrel_o = w_hf @ prev_irrel_h, w_ho @ prev_irrel_h
        if start <= i <= stop:
            rel_i, rel_g, rel_f, rel_o = (
                rel_i + w_ii @ embedded[i],
                rel_g + w_ig @ embedded[i],
                rel_f + w_if @ embedded[i],
                rel_o + w_io @ embedded[i],
            )
        else:
            irrel_i, irrel_g = irrel_i + w_ii @ embedded[i], irrel_g + w_ig @ embedded[i]
            irrel_f, irrel_o = irrel_f + w_if @ embedded[i], irrel_o + w_io @ embedded[i]
        rel_contrib_i, irrel_contrib_i, bias_contrib_i = decomp_three(rel_i, irrel_i, b_i, sigmoid)
        rel_contrib_g, irrel_contrib_g, bias_contrib_g = decomp_three(rel_g, irrel_g, b_g, np.tanh)
        relevant[i] = rel_contrib_i * (rel_contrib_g + bias_contrib_g) + bias_contrib_i * rel_contrib_g
        irrelevant[i] = (
            irrel_contrib_i * (rel_contrib_g + irrel_contrib_g + bias_contrib_g)
            + (rel_contrib_i + bias_contrib_i) * irrel_contrib_g
        )
        if start <= i <= stop:
            relevant[i] += bias_contrib_i * bias_contrib_g
        else:
            irrelevant[i] += bias_contrib_i * bias_contrib_g
        if i > 0:
            rel_contrib_f, irrel_contrib_f, bias_contrib_f = decomp_three(rel_f, irrel_f, b_f, sigmoid)
            relevant[i] += (rel_contrib_f + bias_contrib_f) * relevant[i - 1]
            irrelevant[i] += (rel_contrib_f + irrel_contrib_f + bias_contrib_f) * irrelevant[
                i - 1
            ] + irrel_contrib_f * relevant[i - 1]
        o = sigmoid(w_io @ embedded[i] + w_ho @ (prev_rel_h + prev_irrel_h) + b_o)
        new_rel_h, new_irrel_h = decomp_tanh_two(relevant[i], irrelevant[i])
        relevant_h[i] = o * new_rel_h
        irrelevant_h[i] = o * new_irrel_h
    return relevant_h[T - 1], irrelevant_h[T - 1]


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=30, embed=8, hidden=6, classes=3, **lstm_kwargs):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, **lstm_kwargs)
        directions = 2 if lstm_kwargs.get("bidirectional") else 1
        self.head = nn.Linear(hidden * directions, classes)

    def forward(self, ids):
        output, (h, c) = self.lstm(self.embedding(ids))
        return self.head(output[:, -1])


def test_lstm_matches_murdoch_reference():
    model = LSTMClassifier().double()
    ids = torch.randint(0, 30, (3, 7))
    start, stop = 2, 4
    mask = torch.zeros(3, 7)
    mask[:, start : stop + 1] = 1

    class LastHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.lstm = model.embedding, model.lstm

        def forward(self, ids):
            return self.lstm(self.embedding(ids))[0][:, -1]

    relevant, irrelevant = contextual_decomposition(LastHidden(), ids, mask)
    for i in range(3):
        ref_rel, ref_irrel = _murdoch_reference(
            model.lstm, model.embedding(ids[i]).detach().double().numpy(), start, stop
        )
        np.testing.assert_allclose(relevant[i].detach().numpy(), ref_rel, atol=1e-10)
        np.testing.assert_allclose(irrelevant[i].detach().numpy(), ref_irrel, atol=1e-10)


@pytest.mark.parametrize("kwargs", [{}, {"bidirectional": True, "num_layers": 2}])
def test_lstm_classifier_additivity_over_token_spans(kwargs):
    model = LSTMClassifier(**kwargs)
    ids = torch.randint(0, 30, (4, 9))
    mask = torch.zeros(4, 9)
    mask[:, 3:6] = 1
    relevant, irrelevant = contextual_decomposition(model, ids, mask)
    torch.testing.assert_close(relevant + irrelevant, model(ids), atol=1e-5, rtol=0)
    zero_rel, _ = contextual_decomposition(model, ids, torch.zeros(4, 9))
    _, full_irrel = contextual_decomposition(model, ids, torch.ones(4, 9))
    # float noise only: the stacked gate evaluation may round identical inputs differently by an ulp
    assert zero_rel.abs().max() < 1e-6 and full_irrel.abs().max() < 1e-5


def test_lstm_seq_first_and_log_softmax_output():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(20, 5)
            self.lstm = nn.LSTM(5, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            _, (h, _) = self.lstm(self.embedding(ids).transpose(0, 1))
            return F.log_softmax(self.head(h[-1]), dim=-1)

    model = SeqFirst()
    ids = torch.randint(0, 20, (3, 6))
    mask = torch.zeros(3, 6)
    mask[:, :2] = 1
    relevant, irrelevant = contextual_decomposition(model, ids, mask)
    torch.testing.assert_close(relevant + irrelevant, model(ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- errors


def test_unsupported_module_names_path_and_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.GRU(4, 4, batch_first=True)))
    with pytest.raises(UnsupportedLayerError, match=r"GRU.*'1\.0'"):
        contextual_decomposition(model, torch.randn(2, 3, 4), torch.ones(2, 3))


def test_unsupported_function_names_it():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.inner(x), dim=1)

    with pytest.raises(UnsupportedLayerError, match=r"cumsum.*register_cd_rule"):
        contextual_decomposition(Sorts(), torch.randn(2, 4), torch.ones(2, 4))


def test_untraceable_control_flow_gives_a_clear_error():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedLayerError, match="could not trace"):
        contextual_decomposition(Dynamic(), torch.randn(2, 4), torch.ones(2, 4))


def test_wrong_mask_shape_raises():
    with pytest.raises(MaskShapeError, match=r"\(2, 5\).*\(2, 4\)"):
        contextual_decomposition(nn.Linear(4, 2), torch.randn(2, 4), torch.ones(2, 5))
    with pytest.raises(MaskShapeError, match="token ids"):
        contextual_decomposition(LSTMClassifier(), torch.randint(0, 30, (2, 5)), torch.ones(2, 4))


def test_custom_rule_registration_is_used_and_module_is_a_leaf():
    class Clamp(nn.Module):
        def forward(self, x):
            return torch.clamp(x, 0, 1)

    @register_cd_rule(Clamp)
    def _clamp(module, x):
        return Decomposition(x.relevant.clamp(0, 1), x.total.clamp(0, 1))

    x = torch.tensor([[0.5, 2.0]])
    relevant, irrelevant = contextual_decomposition(nn.Sequential(Clamp()), x, torch.tensor([[1.0, 0.0]]))
    assert relevant.tolist() == [[0.5, 0.0]] and irrelevant.tolist() == [[0.0, 1.0]]


def test_bf16_autocast_keeps_additivity_to_bf16_precision():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        relevant, irrelevant = contextual_decomposition(model, x, _random_mask(x.shape))
        expected = model(x)
    assert torch.isfinite(relevant).all()
    torch.testing.assert_close((relevant + irrelevant).float(), expected.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    "relu", [nn.ReLU(), Lambda(F.relu), Lambda(torch.relu)], ids=["module", "F.relu", "torch.relu"]
)
@pytest.mark.parametrize(
    "pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1), Lambda(lambda t: F.max_pool2d(t, 2))]
)
def test_relu_then_max_pool_decomposes_like_max_pool_then_relu(pool, relu):
    """ReLU and max pooling commute, so CD must too. On a black background every pre-activation of a window can be
    negative; reading both parts at whichever zero max pooling picks among ReLU's ties would depend on the tie
    break. The positions come from the pre-activation instead: those that pooling before the ReLU reads."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    conv.bias.data.fill_(-0.3)  # most windows of a black background are negative everywhere
    head = nn.Linear(4 * 4 * 4, 3)  # both poolings give 4 x 4 maps
    x = torch.zeros(6, 1, 8, 8)
    x[:, :, 2:6, 3:5] = torch.rand(6, 1, 4, 2)  # a small stroke; the rest is background
    mask = torch.zeros_like(x)
    mask[..., 4:, :] = 1.0
    relu_first = nn.Sequential(conv, relu, pool, nn.Flatten(), head)
    pool_first = nn.Sequential(conv, pool, relu, nn.Flatten(), head)
    torch.testing.assert_close(relu_first(x), pool_first(x))
    dead_windows = (F.max_pool2d(conv(x), 2) <= 0).float().mean()
    assert dead_windows > 0.5
    for a, b in zip(contextual_decomposition(relu_first, x, mask), contextual_decomposition(pool_first, x, mask)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_constant_where_both_parts_are_zero_goes_to_the_irrelevant_part_unless_all_is_masked():
    """Every unit of the first layer is dead, so the output is the head's bias added to two zero parts. A partial
    mask gives the masked part none of it (before: the masked share of the input magnitude, which trained
    ColorDigits' CDEP to 18.3 % reversed-colour accuracy where this rule gives 28.0 %); a full mask gives it all."""
    conv = nn.Conv2d(1, 2, 3, padding=1)
    conv.weight.data.fill_(0.1)
    conv.bias.data.fill_(-10.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))
    x = torch.rand(4, 1, 4, 4)
    partial = torch.zeros_like(x)
    partial[..., :2] = 1.0
    relevant, irrelevant = contextual_decomposition(model, x, partial)
    assert torch.equal(relevant, torch.zeros_like(relevant))
    torch.testing.assert_close(irrelevant, model(x))
    relevant, irrelevant = contextual_decomposition(model, x, torch.ones_like(x))
    assert torch.equal(irrelevant, torch.zeros_like(irrelevant))
