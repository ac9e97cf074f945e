"""The user's door: Hydra entry point, stage registry, storage, tracking and Ray helpers."""
