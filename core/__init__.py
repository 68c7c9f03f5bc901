"""Prefix-RFT trainer: a library with no knowledge of HTTP, the database or the queue."""
