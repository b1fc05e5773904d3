"""SpatialBiasMonitor: the static check's warning, the mean maps' asymmetry under uneven padding, exact values in
every stage, DDP equal to one process, the blind-spot probe and the pictures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai import XAIMixin
from lightning_xai.callbacks import SpatialBiasMonitor
from lightning_xai.errors import MissingMixinError, UnevenPaddingError, XAIConfigurationError
from lightning_xai.functional import (
    mean_activation_map,
    mean_kernel,
    side_asymmetry,
    spatial_bias_statistics,
)
from lightning_xai.metrics import MeanActivationMap
from lightning_xai.visualization import render_blind_spot_maps, render_mean_kernels, render_mean_maps
from tests.helpers import DictDataset, assert_ddp_matches_single, bind, loader, trainer

LAYERS = ["features.0", "features.2"]


def symmetric_stack(seed: int, padding_mode: str = "zeros", depth: int = 4) -> nn.Sequential:
    """Stride-2 3x3 pad-1 convolutions with random kernels made mirror-symmetric in both directions.

    With symmetric kernels and inputs whose distribution is symmetric, the mean map can only be asymmetric if the
    padding is: a layer whose far-side padding is never read (uneven) sees zeros on the top/left border only.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = [1, 8, 16, 16, 16][: depth + 1]
    for cin, cout in zip(channels, channels[1:]):
        conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, padding_mode=padding_mode)
        with torch.no_grad():
            w = conv.weight
            conv.weight.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def layer_asymmetries(stack: nn.Sequential, size: int, seed: int = 0) -> list[tuple[float, float]]:
    """``(tb, lr)`` asymmetry of each ReLU's mean map over 256 uniform random inputs."""
    x = torch.rand(256, 1, size, size, generator=torch.Generator().manual_seed(seed))
    found = []
    with torch.no_grad():
        for layer in stack:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                stats = spatial_bias_statistics(mean_activation_map(x))
                found.append((float(stats["tb_asymmetry"]), float(stats["lr_asymmetry"])))
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uneven_padding_makes_mean_maps_asymmetric_and_even_padding_leaves_them_symmetric(seed):
    # 32: every stage is uneven, (32 + 2 - 3) % 2 = 1, so only the top/left padding row is read; 33 -> 17 -> 9 -> 5:
    # every stage pads both sides, and with symmetric kernels the mean maps are symmetric up to sampling noise
    uneven = layer_asymmetries(symmetric_stack(seed), 32)
    even = layer_asymmetries(symmetric_stack(seed), 33)
    assert max(abs(v) for pair in even for v in pair) < 0.01, even
    assert max(abs(v) for pair in uneven for v in pair) > 0.02, uneven
    # at the first layer the zero-padded top row and left column are weaker (fewer non-zero taps): negative
    assert uneven[0][0] < -0.003 and uneven[0][1] < -0.003, uneven[0]


def test_mirror_padding_removes_most_of_the_asymmetry_at_the_uneven_size():
    zeros = layer_asymmetries(symmetric_stack(0), 32)
    mirrored = layer_asymmetries(symmetric_stack(0, "reflect"), 32)
    worst = max(abs(v) for pair in zeros for v in pair)
    assert max(abs(v) for pair in mirrored for v in pair) < worst / 3, (mirrored, zeros)


# ----------------------------------------------------------------------------------------------- callback


class StridedCNNBody(XAIMixin):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


StridedCNN = bind(StridedCNNBody)


def images(n: int = 16, size: int = 16, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(input=torch.rand(n, 1, size, size, generator=g), target=torch.randint(0, 3, (n,), generator=g))


def _expected(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """The callback's values computed by hand: hooked conv outputs over every probe input, the functional kernels."""
    maps = {}
    hooks = [
        model.get_submodule(layer).register_forward_hook(lambda _m, _a, out, layer=layer: maps.__setitem__(layer, out))
        for layer in LAYERS
    ]
    with torch.no_grad():
        model.eval()(inputs)
    for hook in hooks:
        hook.remove()
    values = {}
    for layer in LAYERS:
        for key, value in spatial_bias_statistics(mean_activation_map(maps[layer]).double()).items():
            values[f"{layer}/{key}"] = float(value)
        kernel = mean_kernel(model.get_submodule(layer).weight)
        values[f"{layer}/kernel_lr_asymmetry"] = float(side_asymmetry(kernel, -1))
        values[f"{layer}/kernel_tb_asymmetry"] = float(side_asymmetry(kernel, -2))
    return values


def test_the_static_check_warns_once_with_the_uneven_layer_paths_and_the_even_sizes(lightning_package):
    monitor = SpatialBiasMonitor(num_samples=16, pictures_every_n_epochs=0)
    run = trainer(lightning_package, max_epochs=2, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"consume their zero padding on one side only") as caught:
        run.fit(bind(StridedCNNBody, lightning_package)(), loader(images(), 8), loader(images(), 8))
    messages = [str(w.message) for w in caught if "zero padding on one side" in str(w.message)]
    assert len(messages) == 1  # once, not per batch or epoch
    # 16 -> 8 -> 4: (16 + 2 - 3) % 2 and (8 + 2 - 3) % 2 are 1; 17 -> 9, 21 -> 11 and 25 -> 13 pad evenly
    assert "['features.0', 'features.2']" in messages[0] and "height [17, 21, 25]" in messages[0], messages[0]
    assert "features.2 (Conv2d) on input (8, 8): dimensions [0, 1]" in messages[0]
    assert "padding_mode='reflect'" in messages[0]
    assert [u.path for u in monitor.uneven if u.dimension == 0] == LAYERS
    assert monitor.last_values["uneven_layers"] == 2.0


def test_an_even_input_size_gives_no_warning_and_strict_raises_before_training(lightning_package):
    monitor = SpatialBiasMonitor(num_samples=16, pictures_every_n_epochs=0, strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*zero padding.*")
        run = trainer(lightning_package, max_epochs=1, callbacks=[monitor])
        run.fit(bind(StridedCNNBody, lightning_package)(), loader(images(size=17), 8), loader(images(size=17), 8))
    assert monitor.uneven == [] and monitor.last_values["uneven_layers"] == 0.0
    model = bind(StridedCNNBody, lightning_package)()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # with input_shape= the check runs in setup; without it, on the first batch: before any step either way
    for strict in (SpatialBiasMonitor(strict=True, input_shape=[1, 16, 16]), SpatialBiasMonitor(strict=True)):
        with pytest.raises(
            UnevenPaddingError, match=r"features\.0 \(Conv2d\) on input \(16, 16\): dimensions \[0, 1\]"
        ):
            trainer(lightning_package, max_epochs=1, callbacks=[strict]).fit(model, loader(images(), 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_validate_and_test_log_the_exact_values_of_the_probe(lightning_package):
    data = images(16)
    monitor = SpatialBiasMonitor(num_samples=16, batch_size=5, pictures_every_n_epochs=0, check_padding=False)
    model = bind(StridedCNNBody, lightning_package)()
    run = trainer(lightning_package, max_epochs=1, callbacks=[monitor])
    run.fit(model, loader(data, 8), loader(data, 8))
    expected = _expected(model, data.tensors["input"])
    assert monitor.last_values.keys() == expected.keys()  # no uneven_layers without the check
    for key, value in expected.items():
        assert monitor.last_values[key] == pytest.approx(value, abs=1e-6), key
    validated = run.validate(model, loader(data, 8), verbose=False)[0]  # inference mode
    tested = run.test(model, loader(data, 8), verbose=False)[0]
    for key, value in expected.items():
        assert validated[f"spatial/{key}"] == pytest.approx(value, abs=1e-6), key
        assert tested[f"test/spatial/{key}"] == pytest.approx(value, abs=1e-6), key
    assert not any(key.startswith("spatial/") for key in tested)
    assert monitor.epochs_computed == 2  # fit + validate; test does not advance the cadence
    run.fit(model, loader(data, 8), loader(data, 8))  # the states made under inference mode still update in fit


def test_default_layers_are_every_convolution_and_named_layers_may_be_any_spatial_module(lightning_package):
    data = images(8)
    default = SpatialBiasMonitor(num_samples=8, pictures_every_n_epochs=0, check_padding=False)
    relus = SpatialBiasMonitor(
        layers=["features.1", "features"], num_samples=8, pictures_every_n_epochs=0, check_padding=False, name="relu"
    )
    run = trainer(lightning_package, max_epochs=1, callbacks=[default, relus])
    run.fit(bind(StridedCNNBody, lightning_package)(), loader(data, 8), loader(data, 8))
    assert {k.split("/")[0] for k in default.last_values} == set(LAYERS)
    # a non-convolution has a map and no kernel
    keys = ("border_ratio", "lr_asymmetry", "tb_asymmetry")
    assert set(relus.last_values) == {f"{layer}/{key}" for layer in ("features.1", "features") for key in keys}
    assert "relu/features/lr_asymmetry" in run.callback_metrics


def test_a_given_dataset_is_probed_at_the_end_of_training_epochs_without_a_validation_loop(lightning_package):
    probe = images(6, seed=3)
    monitor = SpatialBiasMonitor(num_samples=6, dataset=probe, pictures_every_n_epochs=0, check_padding=False)
    model = bind(StridedCNNBody, lightning_package)()
    trainer(lightning_package, max_epochs=2, callbacks=[monitor]).fit(model, loader(images(8), 8))
    assert monitor.epochs_computed == 2
    expected = _expected(model, probe.tensors["input"])
    assert monitor.last_values["features.2/tb_asymmetry"] == pytest.approx(
        expected["features.2/tb_asymmetry"], abs=1e-6
    )


def test_the_blind_spot_probe_is_logged_with_a_stimulus(lightning_package, tmp_path):
    data = images(8)
    stimulus = torch.ones(4, 4)
    monitor = SpatialBiasMonitor(num_samples=8, blind_spot_stimulus=stimulus, blind_spot_target=1, check_padding=False)
    logger = lightning_package.loggers.CSVLogger(tmp_path, name="run", version="")
    model = bind(StridedCNNBody, lightning_package)()
    run = trainer(lightning_package, max_epochs=1, callbacks=[monitor], logger=logger)
    run.fit(model, loader(data, 8), loader(data, 8))
    from lightning_xai.functional import blind_spot_map

    expected = blind_spot_map(model, stimulus, (1, 16, 16), target=1)
    assert monitor.last_values["blind_spot/mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert monitor.last_values["blind_spot/min"] == pytest.approx(float(expected.min()), abs=1e-6)
    pictures = sorted(p.parent.name for p in Path(logger.log_dir, "media").glob("*/*.png"))
    assert pictures == ["spatial_blind_spot", "spatial_mean_kernels", "spatial_mean_maps"], pictures


@pytest.mark.ddp
@pytest.mark.parametrize("dataset", [None, images(12, seed=1)], ids=["loader", "dataset"])
def test_ddp_spawn_gives_the_single_process_values(dataset):
    # 16 validation samples, probe of 16: one process maps all of them, two ranks 8 each, sum states add up; a
    # given dataset (the same on every rank) is drawn once and split between the ranks
    assert_ddp_matches_single(
        StridedCNN,
        lambda: [SpatialBiasMonitor(num_samples=16, batch_size=4, pictures_every_n_epochs=0, dataset=dataset)],
        images(16),
        batch_size=16,
        stage="validate",
        prefixes=("spatial/",),
        atol=1e-6,
        rtol=1e-5,
        parameters=False,
    )


def test_clear_errors(lightning_package):
    with pytest.raises(XAIConfigurationError, match="num_samples"):
        SpatialBiasMonitor(num_samples=0)
    with pytest.raises(XAIConfigurationError, match="blind_spot_canvas"):
        SpatialBiasMonitor(blind_spot_canvas="noise")
    with pytest.raises(XAIConfigurationError, match="input_shape"):
        SpatialBiasMonitor(input_shape=[16])
    model = bind(StridedCNNBody, lightning_package)()
    with pytest.raises(XAIConfigurationError, match=r"no submodule 'features.9'"):
        SpatialBiasMonitor(layers=["features.9"]).setup(trainer(lightning_package), model, "fit")

    class Dense(XAIMixin, lightning_package.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

    with pytest.raises(XAIConfigurationError, match="has none: pass layers="):
        SpatialBiasMonitor().setup(trainer(lightning_package), Dense(), "fit")

    class Plain(lightning_package.LightningModule):
        pass

    with pytest.raises(MissingMixinError, match="XAIMixin"):
        SpatialBiasMonitor().setup(trainer(lightning_package), Plain(), "fit")


def test_the_metric_sizes_itself_per_reset_and_refuses_a_changed_size():
    metric = MeanActivationMap()
    metric.update(torch.zeros(0, 3, 4, 4))  # an empty share sizes the sum
    metric.update(torch.full((2, 3, 4, 4), -2.0))
    assert torch.equal(metric.compute(), torch.full((4, 4), 2.0, dtype=torch.float64))
    with pytest.raises(XAIConfigurationError, match=r"this update's map is \(5, 5\)"):
        metric.update(torch.zeros(1, 3, 5, 5))
    metric.reset()
    metric.update(torch.ones(1, 2, 5))  # 1-D maps too
    assert metric.compute().shape == (5,)


def test_the_pictures_are_rendered_with_layer_names(tmp_path):
    maps = {"features.0": torch.rand(16, 16), "features.2": torch.rand(8, 8), "conv1d": torch.rand(12)}
    kernels = {"features.0": torch.rand(3, 3), "conv1d": torch.rand(5)}
    for image in (
        render_mean_maps(maps),
        render_mean_kernels(kernels),
        render_blind_spot_maps({"a": torch.rand(9, 9)}),
    ):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.std() > 10  # something is drawn
    with pytest.raises(ValueError, match="no panels"):
        render_mean_maps({})
