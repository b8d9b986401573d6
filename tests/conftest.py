"""Test set-up: a private PREFECT_HOME and one real local Prefect server for the whole session."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Before Prefect is imported anywhere: tests never touch the user's Prefect home or phone home.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="aselect-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "aselect"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"  # pipelines/ also logs outside flows
os.environ.pop("PREFECT_API_URL", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test processes share the cores: one torch thread each (and in every run they start). Two threads per
    # process on 2 busy cores made small in-process dumps up to 14x slower (threads waiting on each other).
    os.environ["OMP_NUM_THREADS"] = "1"

import diffusers  # noqa: E402,F401  (import on the main thread before any thread starts)

ROOT = Path(__file__).resolve().parent.parent
MIGRATED_DB = Path(os.environ["PREFECT_HOME"]) / "migrated-template.db"  # see `prefect_api_url`


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """A real Prefect server on loopback (SQLite in a temp dir), started once per test session.

    A copy of its freshly migrated database seeds this session's PREFECT_HOME (and any `new_prefect_home`), so
    the temporary server of a run without PREFECT_API_URL skips the ~5 s of database migrations."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        database = PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(database)) as source, \
                contextlib.closing(sqlite3.connect(MIGRATED_DB)) as copy:
            source.backup(copy)  # consistent while the server writes
        session_home = Path(os.environ["PREFECT_HOME"])
        if not (session_home / "prefect.db").exists():  # else a temporary server has made and migrated it already
            seed_prefect_home(session_home)
        yield str(PREFECT_API_URL.value())


def seed_prefect_home(home: Path) -> Path:
    """`home` as a PREFECT_HOME whose database is already migrated (a copy of MIGRATED_DB)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MIGRATED_DB, home / "prefect.db")
    return home


@pytest.fixture(scope="session")
def new_prefect_home(prefect_api_url: str) -> Callable[[Path], Path]:
    """Make a directory a PREFECT_HOME whose database is already migrated (once the session server made it)."""
    return seed_prefect_home


@pytest.fixture(scope="session")
def run_cli(prefect_api_url: str):
    """Run `aselect ...` as a real subprocess against the session's Prefect server."""

    def run(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
        proc = subprocess.run([sys.executable, "-m", "aselect", *args], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"aselect {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    return run


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A random DiT-XS/2 saved in aselect's layout, and 120 digits at 8x8 in an ingest-like stage dir."""
    import torch

    from aselect.pipelines.config import IngestConfig
    from aselect.pipelines.ingest import load_dataset
    from aselect.pipelines.models import build_dit, make_scheduler
    from aselect.storage.datasets import write_dataset

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = build_dit("DiT-XS/2", image_size=8, channels=1, num_classes=10)
    model.save_pretrained(root / "model" / "transformer")
    make_scheduler(1000, "linear").save_pretrained(root / "model" / "scheduler")
    (root / "data").mkdir()
    write_dataset(load_dataset(IngestConfig(source="digits", image_size=8, limit=120)), root / "data")
    return str(root / "model"), root / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a slow test first: with `make test TEST_PROCS=2` (whole files spread over processes, in this
    order) the long files start early, and the short ones fill in at the end instead of one long file alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file keeps its order
