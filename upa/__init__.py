"""UP-Adapter study: an unsupervised prototype adapter for CLIP, rebuilt and measured."""

__version__ = "0.1.0"
