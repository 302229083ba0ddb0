"""Differential privacy: clipping/noise postprocessors, user- and sample-level accountants, budget tools."""
