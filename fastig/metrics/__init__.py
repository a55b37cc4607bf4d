"""Evaluation metrics for attributions."""
