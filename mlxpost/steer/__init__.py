"""Representation engineering: steering vectors (extract, apply, sweep), AQI, abliteration."""
