"""Patch embeddings per slide and scale (zarr), and per-patient phenotype clusters."""
