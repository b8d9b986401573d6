"""Prefect tasks: thin wrappers over pipelines/ and storage/ that add caching, logging and progress."""
