"""diep_lightning: Differentiable Expert Pruning (DiEP) for MoE language models on PyTorch Lightning."""

__version__ = "0.1.0"
