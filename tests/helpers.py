"""Small real models and data for the callback tests.

Models are written once as bodies (``XAIMixin`` subclasses without a Lightning base) and bound to a Lightning
package with :func:`bind`, so that one test runs under ``pytorch_lightning`` and ``lightning.pytorch`` alike; the
plain names (``MLP``, ``SmallCNN``, ...) are the ``pytorch_lightning`` bindings.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import lightning.pytorch
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_xai import XAIMixin

#: the Lightning packages every integration test runs under
LIGHTNING_PACKAGES: dict[str, ModuleType] = {"pytorch_lightning": pl, "lightning": lightning.pytorch}


def trainer(package: ModuleType = pl, **kwargs: Any) -> Any:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return package.Trainer(**defaults)


def bind(body: type, package: ModuleType = pl, base: str = "LightningModule") -> type:
    """``body`` as a subclass of ``package.<base>`` (``LightningModule`` or ``LightningDataModule``).

    The class is reachable as an attribute of this module (see ``__getattr__``), so that pickle, and with it
    ``ddp_spawn``, finds it again in a worker process.
    """
    return _bind(body, package, base)


@functools.cache
def _bind(body: type, package: ModuleType, base: str) -> type:
    package_key = next(key for key, value in LIGHTNING_PACKAGES.items() if value is package)
    # no dots: pickle splits a qualified name on them
    qualname = ":".join(
        ("bound", body.__module__.replace(".", "/"), body.__qualname__.replace(".", "/"), package_key, base)
    )
    name = body.__name__.removesuffix("Body")
    return type(name, (body, getattr(package, base)), {"__module__": __name__, "__qualname__": qualname})


def __getattr__(name: str) -> type:
    # pickle (a ddp_spawn worker) looks a bound class up by name: bind it again from its body
    if not name.startswith("bound:"):
        raise AttributeError(name)
    import importlib

    _, module_name, body_name, package_key, base = name.split(":")
    body = importlib.import_module(module_name.replace("/", "."))
    for part in body_name.split("/"):
        body = getattr(body, part)
    return _bind(body, LIGHTNING_PACKAGES[package_key], base)


class DictDataset(Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


class TupleDataset(Dataset):
    def __init__(self, x, y, mask):
        self.x, self.y, self.mask = x, y, mask

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], {"mask": self.mask[i]}


def decoy_tabular(n: int = 256, seed: int = 0, reversed_decoy: bool = False):
    """Feature 0 is a noisy copy of the label, feature 1 a perfect decoy (reversed at test time)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    signal = (2 * y - 1).float() + 0.6 * torch.randn(n, generator=g)
    decoy = (2 * (1 - y if reversed_decoy else y) - 1).float()
    noise = torch.randn(n, 2, generator=g)
    x = torch.stack([signal, decoy], dim=1)
    x = torch.cat([x, noise], dim=1)
    mask = torch.zeros(n, 4)
    mask[:, 1] = 1
    return x, y, mask


class MLPBody(XAIMixin):
    def __init__(self, in_features: int = 4, classes: int = 2, lr: float = 0.05, optimizer: str = "adam"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, classes))
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        data = batch if isinstance(batch, dict) else {"input": batch[0], "target": batch[1]}
        return F.cross_entropy(self(data["input"]), data["target"])

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SmallCNNBody(XAIMixin):
    def __init__(self, channels: int = 1, size: int = 12, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * (size // 4) ** 2, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LSTMTextClassifierBody(XAIMixin):
    def __init__(self, vocab: int = 40, embed: int = 16, hidden: int = 16, classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        return self.xai_forward_from_embeddings(self.embedding(ids), {})

    def xai_embed(self, input_ids):
        return self.embedding(input_ids)

    def xai_forward_from_embeddings(self, embeddings, batch):
        output, _ = self.lstm(embeddings)
        return self.head(output[:, -1])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


MLP = bind(MLPBody)
SmallCNN = bind(SmallCNNBody)
LSTMTextClassifier = bind(LSTMTextClassifierBody)


def token_decoy_data(n: int = 64, length: int = 8, vocab: int = 40, seed: int = 0):
    """Token 1 at position 2 encodes the label (a decoy); its span is annotated as forbidden."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    ids[:, 2] = labels + 1
    spans = [[(2, 3)] for _ in range(n)]
    return ids, labels, spans


def loader(dataset, batch_size: int, shuffle: bool = False, collate_fn=None):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn)


def tiny_bert_config(**overrides):
    """A random-weight BERT small enough for CPU tests (no hub download); dropout off for exact comparisons."""
    import transformers

    settings = dict(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return transformers.BertConfig(**settings)


class InterleavedRanks(torch.utils.data.Sampler[int]):
    """Rank ``r`` of ``world_size`` takes rows ``r, r + world_size, ...`` in order, its rank read when iterating.

    With per-rank batches of ``B / world_size``, step ``k`` of every rank together holds rows ``kB .. (k+1)B - 1``:
    the single process's batch ``k``. The rank is read from ``torch.distributed`` in ``__iter__``, after
    ``ddp_spawn`` has started the process group.
    """

    def __init__(self, num_rows: int, world_size: int) -> None:
        if num_rows % world_size:
            raise ValueError(f"InterleavedRanks: {num_rows} rows do not split evenly over {world_size} ranks.")
        self.num_rows, self.world_size = num_rows, world_size

    def __iter__(self):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        return iter(range(rank, self.num_rows, self.world_size))

    def __len__(self) -> int:
        return self.num_rows // self.world_size


def assert_ddp_matches_single(
    make_model: Any,
    make_callbacks: Any,
    dataset: Dataset,
    *,
    batch_size: int,
    stage: str = "fit",
    prefixes: tuple[str, ...] = ("xai/",),
    ignore: tuple[str, ...] = (),
    parameters: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    package: ModuleType = pl,
    **trainer_kwargs: Any,
) -> dict[int, dict[str, Any]]:
    """Runs ``make_model()`` with ``make_callbacks()`` in one process and under ``ddp_spawn`` with two CPU processes.

    Every batch of the single process holds ``batch_size`` samples; each DDP rank gets half of them, rank
    ``r`` the rows ``r, r + 2, ...`` of the same consecutive block (:class:`InterleavedRanks`; Lightning's
    distributed sampler would shuffle), so the two runs see the same global batches at every step.
    Asserts that the logged values whose keys
    start with ``prefixes`` (except those ending with a suffix in ``ignore``) and (with ``parameters``) the trained
    parameters agree, in the spirit of torchmetrics' ``MetricTester``. ``ddp_spawn`` returns rank 0's parameters
    and ``callback_metrics`` to this process (parameters the model lacked before ``fit`` are not returned).
    Returns ``{devices: {"values": ..., "parameters": ...}}`` for further assertions.
    """
    results: dict[int, dict[str, Any]] = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        model = make_model()
        run = trainer(
            package,
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
            callbacks=make_callbacks(),
            **trainer_kwargs,
        )
        sampler = InterleavedRanks(len(dataset), devices)
        getattr(run, stage)(model, DataLoader(dataset, batch_size=batch_size // devices, sampler=sampler))
        results[devices] = {
            "values": {k: v.item() for k, v in run.callback_metrics.items() if k.startswith(prefixes)},
            "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        }
    single, distributed = results[1], results[2]
    assert single["values"], f"nothing logged under {prefixes}"
    assert distributed["values"].keys() == single["values"].keys()
    for key, value in single["values"].items():
        if key.endswith(ignore) and ignore:
            continue
        assert abs(distributed["values"][key] - value) <= atol + rtol * abs(value), (
            key,
            distributed["values"][key],
            value,
        )
    if parameters:
        assert distributed["parameters"].keys() == single["parameters"].keys()
        for name, value in single["parameters"].items():
            torch.testing.assert_close(distributed["parameters"][name], value, atol=atol, rtol=rtol, msg=name)
    return results


def tiny_gpt2(tokenizer, seed: int = 0, **overrides):
    """A random-weight GPT-2 for ``tokenizer`` small enough for CPU tests (no hub download), dropout off."""
    import transformers

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()


class CausalLMBody:
    """A LightningModule body that fine-tunes a Hugging Face causal LM (``self.model``) on ``input_ids`` batches."""

    def __init__(self, model, tokenizer, lr: float = 3e-3):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr

    def _loss(self, batch):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
