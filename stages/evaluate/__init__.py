"""Evaluation of trained checkpoints (SDXL Fig. 12, Tables 2 and 3): metrics, feature networks, the `evaluate`
stage and the image measures of the paper-effect experiments. Entry point: ``stages.evaluate.stage:run``."""
