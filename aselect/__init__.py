"""aselect: A-SelecT timestep and feature selection for Diffusion Transformers, as a Prefect pipeline.

The layers live in the repository's top-level folders and install as one namespace (pyproject's package-dir):
`aselect.storage` (on-disk layout, the bottom), `aselect.pipelines` (domain code, no Prefect), `aselect.tasks`
(Prefect tasks, one per stage) and `aselect.flows` (the flows and the `aselect` CLI); `aselect.configs` holds
the bundled run configs.
"""

import os

# transformers (which diffusers imports when present) warns at import time about optional image backends
# (torchvision) that aselect never uses; its errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
