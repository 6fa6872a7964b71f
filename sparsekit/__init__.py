"""sparsekit: train neural networks sparse from scratch and ship them as small, fast CPU models."""

__version__ = "0.1.0"
