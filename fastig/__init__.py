"""fastig: fast, trustworthy Integrated-Gradients-family attributions for PyTorch image models."""

__version__ = "0.1.0"
