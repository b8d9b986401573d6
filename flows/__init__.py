"""Prefect flows that chain the stage tasks, and the `aselect` command line."""
