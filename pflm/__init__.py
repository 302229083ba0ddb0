"""pflm: private federated learning of large-vocabulary language models for speech recognition."""

__version__ = "0.1.0"
