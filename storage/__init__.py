"""On-disk layout of a workdir: stage keys, manifests, locks and the Zarr stores stages write."""
