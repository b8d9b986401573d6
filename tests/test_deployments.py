"""prefect.yaml against a real Prefect server and process worker: deploy, trigger by CLI, inspect artifacts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`prefect server start` on loopback with its own PREFECT_HOME, plus a process worker."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "COLUMNS": "250",
                    "PREFECT_WORKER_QUERY_SECONDS": "1"}  # the worker picks a triggered run up within 1 s, not 10
        self.env.pop("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", None)
        self.procs: list[subprocess.Popen] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)

    def spawn(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([PREFECT, *args], cwd=ROOT, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def cli(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> list | dict:
        request = urllib.request.Request(f"{self.api}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.api}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"server did not start:\n{(self.logs / 'server.log').read_text()[-3000:]}")

    def run_deployment(self, name: str, *params: str, timeout: float = 300) -> dict:
        """`prefect deployment run NAME --param ...`, then wait until the flow run is final."""
        args = ["deployment", "run", name]
        for param in params:
            args += ["--param", param]
        out = self.cli(*args)
        run_id = re.search(r"flow-run/([0-9a-f-]{36})", out).group(1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} not final:\n{(self.logs / 'worker.log').read_text()[-3000:]}")

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        runs = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}  # names are "<stage>-<suffix>"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:  # a test server needs no graceful exit: in full-suite runs one process once lingered 30 s
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(new_prefect_home, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(new_prefect_home(tmp_path_factory.mktemp("prefect-home")))
    srv.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(srv.port))
    try:
        srv.wait_healthy()
        srv.cli("work-pool", "create", "aselect-local", "--type", "process", "--overwrite")
        srv.cli("--no-prompt", "deploy", "--all", timeout=180)
        srv.spawn("worker", "worker", "start", "--pool", "aselect-local")
        yield srv
    finally:
        srv.stop()


def test_deployments_from_prefect_yaml(server: Server) -> None:
    names = server.cli("deployment", "ls")
    for name in ("aselect-pipeline/digits", "aselect-pipeline/mnist5k", "aselect-pipeline/shapes",
                 "aselect-benchmark/nightly"):
        assert name in names
    nightly = server.post("/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})[0]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"


def test_triggered_run_completes_with_artifacts_then_reruns_cached(server: Server, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    run = server.run_deployment("aselect-pipeline/smoke", f"workdir={workdir}")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    states = server.task_states(run["id"])
    assert set(states) >= {"ingest", "backbone", "calibrate", "score", "select", "dump", "probe"}
    assert set(states.values()) == {"Completed"}

    listed = server.cli("artifact", "ls")
    for key in ("stage-ingest", "stage-backbone", "stage-probe", "scores-hfr", "selection", "pretrain-progress",
                "dump-progress"):
        assert key in listed, listed
    stage = server.cli("artifact", "inspect", "stage-backbone")
    assert "pretrained DiT-XS/2" in stage and str(workdir) in stage
    scores = server.cli("artifact", "inspect", "scores-hfr")
    assert '"timestep"' in scores and '"attn"' in scores

    again = server.run_deployment("aselect-pipeline/smoke", f"workdir={workdir}")
    assert again["state"]["type"] == "COMPLETED"
    assert set(server.task_states(again["id"]).values()) == {"Cached"}


def test_bad_parameter_fails_the_run_with_the_one_line_error(server: Server, tmp_path: Path) -> None:
    run = server.run_deployment("aselect-pipeline/smoke", f"workdir={tmp_path / 'w'}",
                                'overrides=["ingest.sourse=digits"]')
    assert run["state"]["type"] == "FAILED"
    assert "ingest.sourse: unknown key" in run["state"]["message"]


def test_malformed_parameter_is_refused_at_submission(server: Server) -> None:
    proc = subprocess.run([PREFECT, "deployment", "run", "aselect-pipeline/smoke", "--param", 'overrides=["nonsense"]'],
                          cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Validation failed for field 'overrides[0]'" in proc.stdout + proc.stderr
    assert "'nonsense' does not match" in proc.stdout + proc.stderr


def _finished_smoke_workdir(server: Server, tmp_path: Path) -> Path:
    """The workdir of a completed `aselect-pipeline/smoke` run on this server, else of a new one."""
    runs = server.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    for run in runs:
        workdir = Path(run["parameters"].get("workdir") or "")
        if run["parameters"].get("config") == "smoke" and str(workdir) and (workdir / "probe").is_dir():
            return workdir
    workdir = tmp_path / "smoke-work"
    run = server.run_deployment("aselect-pipeline/smoke", f"workdir={workdir}")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return workdir


def test_predict_deployment_writes_the_runs_predictions_of_a_folder(server: Server, tmp_path: Path) -> None:
    import csv

    import numpy as np
    from PIL import Image

    from aselect.pipelines.predict import load_run
    from aselect.storage.datasets import read_dataset

    assert "aselect-predict/predict" in server.cli("deployment", "ls")
    deployed = server.post("/deployments/filter", {"deployments": {"name": {"any_": ["predict"]}}})[0]
    assert deployed["parameters"]["paths"] == ["aselect-work/predict-inbox"]  # the documented example
    workdir = _finished_smoke_workdir(server, tmp_path)
    run = load_run(workdir)
    data = read_dataset(run.stages["ingest"])
    inbox = tmp_path / "inbox"
    (inbox / "more").mkdir(parents=True)
    for i, index in enumerate(data.test_idx[:6]):
        image = np.asarray(data.images[index])
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
            inbox / ("more" if i % 2 else ".") / f"{index:04d}.png")
    (inbox / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "predictions.csv"
    out.write_text("an earlier table\n")

    flow_run = server.run_deployment("aselect-predict/predict", f"paths={json.dumps([str(inbox)])}",
                                     f"workdir={workdir}", f"out={out}", "skip_bad=true")
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert server.task_states(flow_run["id"]) == {"predict": "Completed"}
    images, names = run.read_images([inbox], skip_bad=True, skipped=[])
    expected = run.predict(images)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["path"] for r in rows] == names and len(names) == 6
    assert [r["class"] for r in rows] == [run.class_names[c] for c in expected.classes]
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in run.class_names] for r in rows],
                               expected.probabilities, rtol=1e-6, atol=1e-9)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the table was swapped in whole
    artifact = server.cli("artifact", "inspect", "predictions")
    assert f"6 images with run {run.key}" in artifact and "1 skipped" in artifact and "broken.png" in artifact
