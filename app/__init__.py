"""Streaming exponential moving averages over HTTP, kept atomically in Redis."""

__version__ = "0.1.0"
