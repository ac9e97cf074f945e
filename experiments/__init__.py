"""Experiments that measure what the shipped stages train: ``python experiments/paper_effects.py`` (the paper's
effects, docs/results.md), ``experiments/learning_check.py``, ``experiments/oracle_conditioning.py``."""
