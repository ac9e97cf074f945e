"""Tests of the SDXL model core (sdxl/)."""
