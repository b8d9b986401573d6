"""Bundled run configs (package data `aselect.configs`), loaded by name: `aselect run digits`."""
