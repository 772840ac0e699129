"""Experiment scripts; see README.md."""
