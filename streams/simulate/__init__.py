"""Synthetic data for tests and the demo: product imagery and its fraudulent edits."""
