"""The Prefix-RFT trainer: a library that imports nothing of the service, HTTP, the database or the queue."""
