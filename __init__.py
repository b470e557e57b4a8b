"""tailforge: diffusion data generation and augmentation for classifier training."""

__version__ = "0.1.0"
