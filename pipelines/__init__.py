"""Domain code for aselect: datasets, DiT backbones, features, scorers, probes. No Prefect here."""
