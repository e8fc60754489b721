"""go-deeper: a frozen ImageNet CNN as a featurizer, a small classifier on top, batch or streaming."""

__version__ = "0.1.0"
