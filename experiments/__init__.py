"""Toy-scale reproductions of the SDXL report's effects (``python experiments/paper_effects.py``)."""
