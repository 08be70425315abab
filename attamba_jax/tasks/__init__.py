"""Synthetic tasks that measure what a model can do, beyond its loss: recall under compression (``mqar``)."""
