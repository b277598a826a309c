"""Summaries, overviews and plots of models, runs and data."""
