"""Experiment-tracking pipeline for PyTorch image classification.

Modules, one concern each (data flows params -> config -> stage -> outputs):
config (typed params.yaml), data (datasets as in-memory tensors), models,
loop (the one training loop), evaluation (scikit-learn metrics),
reporting (files for DVC/humans), stages (one function per DVC stage),
cli (`python -m pipeline <command>`).
"""
