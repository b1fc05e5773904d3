"""Small real models and data for the callback tests."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_xai import XAIMixin


def trainer(**kwargs) -> pl.Trainer:
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
    return pl.Trainer(**defaults)


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


class MLP(XAIMixin, pl.LightningModule):
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


class SmallCNN(XAIMixin, pl.LightningModule):
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


class LSTMTextClassifier(XAIMixin, pl.LightningModule):
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
