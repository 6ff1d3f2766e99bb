"""Measurement scripts; each prints a table of medians. See README for the figures."""
