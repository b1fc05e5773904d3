"""lightning_xai: explanations as part of training in PyTorch Lightning."""

__version__ = "0.1.0"
