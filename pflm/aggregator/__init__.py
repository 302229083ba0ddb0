"""Aggregators: combine the clipped device updates of one round into their sum (plain or secure)."""
