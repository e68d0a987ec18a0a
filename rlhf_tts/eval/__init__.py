"""Evaluation: judges no training loop optimises, metrics, plots and reports."""
