"""Metrics: Fréchet distance, precision/recall, judge alignment."""
