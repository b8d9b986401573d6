"""Reliability with real processes: SIGKILL at seeded failpoints inside every stage, then resume; two runs at once.

Each `aselect run` here is a real subprocess (its own process group, so a kill takes its dump and Dask
workers too) against the session's Prefect server. Outputs are compared file by file with an
uninterrupted run: arrays, weights and pictures byte for byte, JSON without timing fields.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# stage -> the failpoint inside it (storage/faults.py)
STAGE_POINTS = {"ingest": "ingest", "pretrain": "pretrain", "dump": "chunk", "score": "pair", "probe": "fit"}
# the stage each stretch of a smoke run between failpoints belongs to, in order
SEGMENT_STAGES = ["ingest", "backbone", "calibrate", "score", "dump", "probe"]
VOLATILE = {"seconds", "worker", "resumed_from", "started", "finished", "attempts", "pid", "bytes", "train_seconds",
            "dump_seconds", "images_timesteps_per_second", "items_reused", "items_computed", "batches",
            "images_timesteps", "bytes_written", "summary", "task_seconds"}


def aselect(api_url: str, workdir: Path, *overrides: str, **env: str) -> subprocess.Popen[str]:
    """Start `aselect run smoke --json` (with `--set` overrides) as its own process group: a failpoint kill takes
    the whole group."""
    argv = [sys.executable, "-m", "aselect", "run", "smoke", "--workdir", str(workdir), "--json"]
    for override in overrides:
        argv += ["--set", override]
    return subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PREFECT_API_URL=api_url, **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def stage_files(stage: Path) -> dict[str, object]:
    """A stage's outputs: bytes of every file, JSON without timing fields; resume leftovers and manifests aside."""
    files: dict[str, object] = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = path.relative_to(stage).as_posix()
        if rel == "manifest.json" or "checkpoints/" in rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        files[rel] = _strip(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return files


def complete_stages(workdir: Path) -> dict[str, Path]:
    """`name/key` -> directory of every stage whose manifest says complete."""
    found = {}
    for manifest in workdir.glob("*/*/manifest.json"):
        if json.loads(manifest.read_text()).get("status") == "complete":
            found[f"{manifest.parent.parent.name}/{manifest.parent.name}"] = manifest.parent
    return found


def assert_same_stage(got: Path, want: Path) -> None:
    got_files, want_files = stage_files(got), stage_files(want)
    assert sorted(got_files) == sorted(want_files), f"{got}: files differ from {want}"
    for rel, content in want_files.items():
        assert got_files[rel] == content, f"{got / rel} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """An uninterrupted smoke run, and the failpoints it passed, in order."""
    workdir = tmp_path_factory.mktemp("reference")
    hits = workdir.parent / "reference-hits.log"
    code, out, err = finish(aselect(prefect_api_url, workdir, ASELECT_FAILPOINT_LOG=str(hits)))
    assert code == 0, err[-3000:]
    return workdir, json.loads(out), hits.read_text().split()


def segments(hits: list[str]) -> list[tuple[str, int]]:
    """The run as (failpoint, consecutive hits) in order, e.g. chunk(calibrate), pair, chunk(selected pair)."""
    out: list[tuple[str, int]] = []
    for name in (h for h in hits if h in STAGE_POINTS.values()):
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return out


def test_sigkill_inside_every_stage_resumes_to_identical_outputs(prefect_api_url: str, reference, tmp_path: Path):
    ref_dir, ref_result, hits = reference
    ref_stages = complete_stages(ref_dir)
    assert len(ref_stages) == 7
    parts = segments(hits)
    assert [name for name, _ in parts] == ["ingest", "pretrain", "chunk", "pair", "chunk", "fit"]
    # Seeded kill points: two in the segments that resume from their own partial state (pretraining from a
    # checkpoint, the calibration dump from its chunk records), so a resume is itself killed and resumed; one
    # elsewhere. The first anywhere but the last hit, the second within what must remain (a resume redoes at
    # least the hits after the last checkpoint or completion record).
    rng = np.random.default_rng(20261126)
    plan, kills = [], {}
    for stage, (point, count) in zip(SEGMENT_STAGES, parts, strict=True):
        assert count >= 2, f"failpoint {point} hit {count} times"
        nths = [int(rng.integers(1, count))]
        if stage in ("backbone", "calibrate"):
            nths.append(int(rng.integers(1, count - nths[0] + 1)))
        plan += [(point, nth) for nth in nths]
        kills[stage] = len(nths)
    workdir = tmp_path / "work"
    for point, nth in plan:
        code, _, err = finish(aselect(prefect_api_url, workdir, ASELECT_FAILPOINT=f"{point}@{nth}"))
        assert code == -signal.SIGKILL, f"expected SIGKILL at {point}@{nth}, exit {code}: {err[-2000:]}"
        # no partial stage is ever reported complete: whatever says complete equals the clean run
        for name, path in complete_stages(workdir).items():
            assert_same_stage(path, ref_stages[name])
    code, out, err = finish(aselect(prefect_api_url, workdir))
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert result["selection"] == ref_result["selection"] and result["metrics"] == ref_result["metrics"]
    final = complete_stages(workdir)
    assert sorted(final) == sorted(ref_stages)
    for name, path in final.items():
        assert_same_stage(path, ref_stages[name])
    # a stage killed k times began k + 1 times
    attempts = {name.split("/")[0]: json.loads((path / "manifest.json").read_text())["attempts"]
                for name, path in final.items()}
    assert all(attempts[stage] >= count + 1 for stage, count in kills.items()), (attempts, kills)


def test_two_concurrent_runs_compute_each_stage_once(prefect_api_url: str, reference, tmp_path: Path) -> None:
    ref_dir, ref_result, _ = reference
    workdir = tmp_path / "shared"
    first, second = aselect(prefect_api_url, workdir), aselect(prefect_api_url, workdir)
    (code1, out1, err1), (code2, out2, err2) = finish(first), finish(second)
    assert code1 == 0, err1[-3000:]
    assert code2 == 0, err2[-3000:]
    results = [json.loads(out1), json.loads(out2)]
    for result in results:
        assert result["selection"] == ref_result["selection"] and result["metrics"] == ref_result["metrics"]
    stages = complete_stages(workdir)
    assert sorted(stages) == sorted(complete_stages(ref_dir))  # one directory per stage, all complete
    for name, path in stages.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["attempts"] == 1, f"{name} was computed {manifest['attempts']} times"
        assert manifest["pid"] in (first.pid, second.pid)
        assert_same_stage(path, ref_dir / name)


def _processes_with(marker: str) -> list[int]:
    """Pids whose environment holds `marker` (a run's private PREFECT_HOME): its server, workers, itself."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT delivered and at its default, as in a shell's foreground job."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_run_in_seconds_and_a_rerun_resumes(prefect_api_url: str, new_prefect_home,
                                                             tmp_path: Path) -> None:
    """SIGINT to the whole process group mid-pretraining, with Prefect's temporary server (no PREFECT_API_URL):
    the run exits 130 in seconds with one line, stops its server, and a rerun resumes from the checkpoint."""
    home, workdir, hits = new_prefect_home(tmp_path / "prefect-home"), tmp_path / "work", tmp_path / "hits.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), ASELECT_FAILPOINT_LOG=str(hits))
    argv = [sys.executable, "-m", "aselect", "run", "smoke", "--workdir", str(workdir),
            "--set", "backbone.pretrain.steps=200", "--set", "backbone.pretrain.checkpoint_every=20"]
    # what a terminal gives: Ctrl-C neither ignored nor blocked, whatever earlier tests left in this process
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_terminal_sigint)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if hits.exists() and hits.read_text().split().count("pretrain") >= 40:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal sends
    interrupted = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - interrupted
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-3000:]
    assert lines[-1].startswith("aselect: interrupted: rerun to resume"), lines[-3:]
    assert took < 30, f"the interrupted run took {took:.0f} s to exit"
    time.sleep(1.0)
    assert _processes_with(str(home)) == [], "the temporary server or a worker outlived the run"
    backbone = next(workdir.glob("backbone/*"))
    assert json.loads((backbone / "manifest.json").read_text())["status"] == "partial"

    env.pop("ASELECT_FAILPOINT_LOG")
    env["PREFECT_API_URL"] = prefect_api_url  # the resume does not depend on the server: skip a temporary one
    done = subprocess.run(argv + ["--json"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads(done.stdout)["stages"]}
    assert "resumed from step" in stages["backbone"]["summary"]


def test_a_run_whose_temporary_server_dies_fails_fast_in_one_line(new_prefect_home, tmp_path: Path) -> None:
    home, workdir, hits = new_prefect_home(tmp_path / "prefect-home"), tmp_path / "work", tmp_path / "hits.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), ASELECT_FAILPOINT_LOG=str(hits))
    proc = subprocess.Popen([sys.executable, "-m", "aselect", "run", "smoke", "--workdir", str(workdir),
                             "--set", "backbone.pretrain.steps=400"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if hits.exists() and hits.read_text().split().count("pretrain") >= 40:
            break
        time.sleep(0.2)
    servers = [pid for pid in _processes_with(str(home)) if pid != proc.pid
               and b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert proc.poll() is None and len(servers) == 1, servers
    os.kill(servers[0], signal.SIGKILL)
    died = time.monotonic()
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err[-3000:]
    assert lines[-1].startswith("aselect: error: the temporary Prefect server exited mid-run (code -9)"), lines[-3:]
    assert time.monotonic() - died < 30
