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

# Using a finished run (`aselect.load_run(workdir)`), imported on first use: `import aselect` stays light (no torch,
# no Prefect).
_LAZY = {"load_run": "aselect.pipelines.predict", "read_images": "aselect.pipelines.predict",
         "Run": "aselect.pipelines.predict", "Prediction": "aselect.pipelines.predict"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aselect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
