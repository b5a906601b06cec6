"""Continuous-Time Distribution Matching (CDM) distillation of text-to-image flow models."""

__version__ = "0.1.0"
