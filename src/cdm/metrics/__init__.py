"""Metrics of images and features: Fréchet distance, precision/recall and bootstrap intervals,
the preference scorers (`scorers` registry), their set-level scoring (`preference`) and the
record of what stands behind each number (`conventions`). Nothing here imports a model family
or the shapes world; the world's own judge-based metrics are `cdm.world.metrics`."""
