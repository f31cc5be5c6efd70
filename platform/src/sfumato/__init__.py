"""sfumato: train image diffusion models from scratch on Ray."""

__version__ = "0.1.0"
