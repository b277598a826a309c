"""Pieces both model families share: backends, input and parameter checks, memory estimates, the model factory."""
