"""Synthetic data for tests and the demo: product imagery, fraudulent edits of it, sample traffic."""
