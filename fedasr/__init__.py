"""fedasr: pruning federated speech-recognition models."""

__version__ = "0.1.0"
