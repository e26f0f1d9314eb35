"""segjax: image segmentation with U-Net and ResNet in JAX/Flax."""

__version__ = "0.1.0"
