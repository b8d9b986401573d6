"""The `aselect` command as a user runs it: real subprocesses against the session's Prefect server (or Prefect's
temporary one), JSON on stdout, one-line errors, `inspect`, and `aselect bench` on the smoke config."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aselect.flows.benchmark import BENCH_WORK, REPORT_CHECKSUM
from aselect.flows.cli import IO_ERRNOS, io_failure, main
from aselect.pipelines.benchmark import README_END, README_START, readme_section
from aselect.pipelines.training import save_checkpoint
from aselect.storage import stages

ROOT = Path(__file__).resolve().parent.parent
ASELECT_STAGES = ["ingest", "backbone", "calibrate", "score", "select", "dump", "probe"]


@pytest.fixture(scope="module")
def cli_run(run_cli, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`aselect run smoke --json` in a fresh workdir, shared by the tests below (they only add on top of it)."""
    workdir = tmp_path_factory.mktemp("cli-work")
    return workdir, run_cli("run", "smoke", "--workdir", str(workdir), "--json", check=True)


def test_cli_run_json_and_inspect(run_cli, cli_run) -> None:
    workdir, proc = cli_run
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object; logs go to stderr
    assert [s["name"] for s in result["stages"]] == ASELECT_STAGES
    assert set(result) >= {"flow", "stages", "selection", "metrics"} and "path" not in result
    assert result["flow"] == "aselect-pipeline" and result["selection"]["policy"] == "aselect"
    assert set(result["stages"][0]) >= {"name", "key", "status", "cached", "seconds", "path"}
    # a label-free choice points to the few-shot selector (the benchmark's lower regret where labels exist)
    assert "select.policy=fewshot" in proc.stderr

    listing = json.loads(run_cli("inspect", "--workdir", str(workdir), "--json", check=True).stdout)
    assert {(s["name"], s["status"]) for s in listing["stages"]} == {(name, "complete") for name in ASELECT_STAGES}
    shown = json.loads(run_cli("inspect", "backbone", "--workdir", str(workdir), "--json", check=True).stdout)
    assert shown["key"] == result["stages"][1]["key"] and "samples.png" in shown["files"]
    text = run_cli("inspect", "--workdir", str(workdir), check=True).stdout
    assert "ingest" in text and "complete" in text


def test_cli_config_errors_are_one_line_without_traceback(run_cli, tmp_path: Path) -> None:
    proc = run_cli("run", "smoke", "--set", "ingest.sourse=digits", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("aselect: error: ")
    assert "ingest.sourse: unknown key" in proc.stderr and "Traceback" not in proc.stderr


# A loaded machine, reproduced: the run's last events are still queued when the CLI exits, where Prefect
# drains them and warns "Still processing items": that warning must not follow the error line.
LAGGING_EVENTS_CLI = """
import asyncio, sys
from aselect.flows import cli
from prefect.events import emit_event
from prefect.events.worker import EventsWorker

handle = EventsWorker._handle
async def slow_handle(self, event):
    await asyncio.sleep(1.0)
    await handle(self, event)
EventsWorker._handle = slow_handle

run = cli.cmd_run
def run_then_emit(args):
    try:
        return run(args)
    finally:
        for i in range(3):
            emit_event(event="aselect.test.lag", resource={"prefect.resource.id": f"aselect.test.{i}"})
cli.cmd_run = run_then_emit
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("server", ["session server", "temporary server"])
def test_cli_error_is_the_last_line_even_when_prefect_events_lag(prefect_api_url: str, tmp_path: Path,
                                                                 server: str) -> None:
    empty = tmp_path / "images"
    (empty / "cats").mkdir(parents=True)
    (empty / "dogs").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if server == "session server":
        env["PREFECT_API_URL"] = prefect_api_url  # else the CLI starts (and must stop) Prefect's temporary server
    args = ["run", "smoke", "--set", "ingest.source=imagefolder", "--set", f"ingest.root={empty}",
            "--workdir", str(tmp_path / "w")]
    proc = subprocess.run([sys.executable, "-c", LAGGING_EVENTS_CLI, *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"aselect: error: {empty}/cats: empty class folder"), proc.stderr[-3000:]
    assert ("Stopping temporary server" in proc.stderr) == (server == "temporary server"), proc.stderr[-3000:]


def stage_dirs(workdir: Path) -> list[Path]:
    return sorted(p.relative_to(workdir) for p in workdir.glob("*/*") if p.parent.name not in ("bench", ".locks"))


@pytest.mark.slow
def test_cli_bench_measures_every_selector_in_a_fresh_workdir(run_cli, cli_run, tmp_path: Path) -> None:
    smoke_workdir, _ = cli_run
    before = stage_dirs(smoke_workdir)
    bench = smoke_workdir / "bench"
    bench.mkdir(exist_ok=True)
    # a previous run whose default A-SelecT scored 5 points higher: this run must flag it
    previous = {"configs": [{"config": "smoke", "selectors": [{"selector": "aselect", "value": 2.0}]}]}
    (bench / "results.json").write_text(json.dumps(previous))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n\ntail\n")

    proc = run_cli("bench", "smoke", "--workdir", str(smoke_workdir), "--json", "--readme", str(readme),
                   check=True, timeout=600)
    report = json.loads(proc.stdout)
    (config,) = report["configs"]
    rows = {r["selector"]: r for r in config["selectors"]}
    assert list(rows) == ["aselect", "aselect-attn_map", "aselect-plain", "aselect-depth", "aselect-published",
                          "fewshot", "hybrid", "rankme", "fixed", "oracle"]
    oracle = rows["oracle"]
    for row in rows.values():
        assert row["regret_points"] == pytest.approx(100 * (oracle["value"] - row["value"]), abs=0.01)
        assert row["cost_ratio"]["forward_passes"] == pytest.approx(
            oracle["forward_passes"] / row["forward_passes"], abs=0.01)
    # forward passes are images x timesteps: 200 images, and the oracle searches the same 10 candidate timesteps as
    # A-SelecT (calibrate.timesteps), not the 4 of dump.timesteps. calibrate.images asks for 64, but calibration
    # may spend half of `aselect run --exhaustive`'s 200 x 4 passes: the default noise_relative signal runs each
    # image and its noise-only twin at 10 timesteps, so C = 400 // 20 = 20; plain runs the image alone, C = 40.
    assert oracle["forward_passes"] == 200 * 10 and rows["aselect"]["forward_passes"] == 2 * 20 * 10 + 200
    assert rows["aselect-plain"]["forward_passes"] == 40 * 10 + 200
    assert (rows["fixed"]["timestep"], rows["fixed"]["layer"], rows["fixed"]["site"]) == (100, 1, "block")
    assert rows["fixed"]["forward_passes"] == 200 and rows["fewshot"]["site"] in ("block", "attn", "mlp")
    # hybrid: the default's t (its calibration reused), then the few-shot probe's 64 images at that t alone
    assert rows["hybrid"]["timestep"] == rows["aselect"]["timestep"] and rows["hybrid"]["site"] in ("block", "attn",
                                                                                                     "mlp")
    assert rows["hybrid"]["forward_passes"] == 2 * 20 * 10 + 64 + 200
    assert "spearman_hfr_vs_probe" in rows["aselect-attn_map"] and "spearman_hfr_vs_probe" not in rows["fixed"]
    assert rows["aselect"]["cached_stages"] == 0 and oracle["cached_stages"] == 0  # measured in this run
    goals = config["goals"]
    assert goals["regret"]["met"] == (rows["aselect"]["regret_points"] <= 1.0)
    assert goals["cost"]["measured"] == rows["aselect"]["cost_ratio"]["compute_seconds"]
    assert goals["cost_forward_passes"]["measured"] == rows["aselect"]["cost_ratio"]["forward_passes"]
    # the forward-pass ratio of A-SelecT is exactly the grid's ceiling T*N / (K*C*T + N)
    assert config["grid"] == {"family": "dit", "timesteps": 10, "candidate_timesteps": 10, "oracle_timesteps": 10,
                              "images": 200, "calibration_images": 20, "calibration_inputs": 2}
    # the default's t, the feature at the authors' relative depth (layer 1 of 2)
    depth = rows["aselect-depth"]
    assert (depth["timestep"], depth["layer"], depth["site"]) == (rows["aselect"]["timestep"], 1, "block")
    # the published configuration: plain HFR of query (one input per image), features query of block 9/24 of 2
    published = rows["aselect-published"]
    assert (published["layer"], published["site"]) == (1, "query")
    assert published["forward_passes"] == 40 * 10 + 200
    assert goals["cost"]["forward_pass_ceiling"] == rows["aselect"]["cost_ratio"]["forward_passes"] == round(
        10 * 200 / (2 * 20 * 10 + 200), 2)
    # the attentive protocol: the attentive probe on the oracle's grid (smoke: t 0, 100, 500 at the linear oracle's
    # layer and site, 2 epochs), the linear oracle's pair and the default's pair
    attentive = config["attentive"]
    grid = {(p["timestep"], p["layer"], p["site"]) for p in attentive["pairs"] if "grid" in p["roles"]}
    assert grid == {(t, oracle["layer"], oracle["site"]) for t in (0, 100, 500)} and attentive["epochs"] == 2
    # the attentive oracle is the best pair probed; every selector's pair was probed, so each has a regret under it
    assert attentive["oracle"]["value"] == max(p["value"] for p in attentive["pairs"])
    assert set(attentive["selectors"]) == set(rows) and all(a["regret_points"] >= 0
                                                            for a in attentive["selectors"].values())
    (mine,) = [p for p in attentive["pairs"] if "default" in p["roles"]]
    assert (mine["timestep"], mine["layer"], mine["site"]) == (rows["aselect"]["timestep"], rows["aselect"]["layer"],
                                                               rows["aselect"]["site"])
    assert mine["linear_value"] == rows["aselect"]["value"] and 0.0 < mine["value"] <= 1.0
    assert attentive["regret_points"] == round(100 * (attentive["oracle"]["value"] - mine["value"]), 2)
    searched = [p for p in attentive["pairs"] if {"grid", "linear oracle"} & set(p["roles"])]
    assert attentive["cost_ratio"]["probe_trainings"] == len(searched)
    # confidence vs C, bootstrapped from the default selector's calibration: the 20 images the budget left it
    curve = config["confidence_curve"]
    assert [p["images"] for p in curve] == [16, 20]
    assert curve[-1]["confidence"] == rows["aselect"]["confidence"] and curve[-1]["agrees"] == 1.0
    assert [p["subsets"] for p in curve] == [8, 1] and all(0.0 <= p["timestep"] <= 1.0 for p in curve)
    assert curve[-1]["selected"] == {"timestep": rows["aselect"]["timestep"], "layer": rows["aselect"]["layer"]}
    assert goals["confidence"]["measured"] == curve[-1]["timestep"]
    assert rows["fewshot"]["confidence"] is None and rows["oracle"]["confidence"] is None
    # regret = timestep regret + feature regret, the best pair at each selected t probed on the oracle's dump
    for row in rows.values():
        assert row["timestep_regret_points"] + row["feature_regret_points"] == pytest.approx(
            row["regret_points"], abs=0.02)
    assert oracle["timestep_regret_points"] == oracle["feature_regret_points"] == 0.0
    # baselines: raw pixels, and an untrained DiT of the same shape at the oracle's pair
    baselines = config["baselines"]
    assert set(baselines) == {"pixels", "random_dit"}
    assert all(b["metric"] == "top1" and 0.0 < b["value"] <= 1.0 for b in baselines.values())
    assert baselines["pixels"]["regret_points"] == round(100 * (oracle["value"] - baselines["pixels"]["value"]), 2)
    assert f"t={oracle['timestep']} layer {oracle['layer']} {oracle['site']}" in baselines["random_dit"]["label"]
    profile = config["probe_vs_t"]
    assert profile["best_score"] >= profile["score_at_smallest_t"] and isinstance(profile["interior_maximum"], bool)
    assert config["seconds"] > 0 and report["leave_one_config_out"] is None  # one config: nothing to hold out

    scaling = config["scaling"]
    assert [p["images"] for p in scaling["points"]] == [100, 200]
    assert scaling["points"][-1]["dump_ratio_to_full"] == 1.0
    by_workers = scaling["scoring_seconds_by_workers"]
    assert set(by_workers) == {"1", "2"} and scaling["dask_speedup"] == round(by_workers["1"] / by_workers["2"], 2)

    assert report["regressions"] == [f"smoke aselect: top1 2.0000 -> {rows['aselect']['value']:.4f}"]
    assert json.loads((bench / "previous.json").read_text()) == previous
    assert json.loads((bench / "results.json").read_text())["configs"] == report["configs"]
    assert "| A-SelecT, our noise_relative HFR of attn (default) |" in (bench / "results.md").read_text()
    for picture in ("cost-vs-regret.png", "smoke-metric-vs-t.png"):
        assert (bench / picture).stat().st_size > 1000
    # the fresh workdir is gone, and the benchmark added no stage to the user's workdir
    assert not (smoke_workdir / BENCH_WORK / "smoke").exists()
    assert stage_dirs(smoke_workdir) == before
    # --readme: the section is regenerated from the JSON copied beside it, the rest kept
    copied = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert readme.read_text() == f"# x\n\n{readme_section(copied)}\n\ntail\n"
    # each finished config's report is kept: a rerun (after an interruption, or with more configs) reuses it
    (kept,) = (bench / "configs").glob("smoke-*.json")
    rerun = run_cli("bench", "smoke", "--workdir", str(smoke_workdir), "--json", check=True, timeout=300)
    kept_report = json.loads(kept.read_text())
    assert kept_report.pop(REPORT_CHECKSUM)  # what a damaged kept report is told by
    assert json.loads(rerun.stdout)["configs"] == report["configs"] == [kept_report]
    assert "bench smoke: finished in an earlier run" in rerun.stderr  # nothing was measured again
    # --reuse: another workdir takes the report from the results file, stamped with the run that measured it
    stamp = report["configs"][0]["measured"]
    assert stamp["bench_code"] == report["bench_code"] and stamp["command"] == report["command"]
    reused = run_cli("bench", "smoke", "--workdir", str(tmp_path / "elsewhere"), "--json", "--reuse",
                     str(bench / "results.json"), check=True, timeout=300)
    assert json.loads(reused.stdout)["configs"] == report["configs"]
    assert "bench smoke: reusing the report measured" in reused.stderr
    # ... from the same config only: a report of another version of it is refused before anything runs
    other = tmp_path / "other.json"
    changed = report["configs"][0] | {"measured": stamp | {"config_digest": "0" * 16}}
    other.write_text(json.dumps({k: v for k, v in report.items() if k not in ("results", "markdown")}
                                | {"configs": [changed]}))
    refused = run_cli("bench", "smoke", "--workdir", str(tmp_path / "elsewhere2"), "--reuse", str(other))
    assert refused.returncode == 2
    assert last_line(refused.stderr).startswith("aselect: error: smoke: the reused report was measured on another "
                                                 "version of this config")
    assert not (tmp_path / "elsewhere2").exists()


# ---------------------------------------------------------------------------------------------
#                        A Prefect API that is not there, a full disk, Ctrl-C
# ---------------------------------------------------------------------------------------------


def aselect_argv(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "aselect", "run", "smoke", "--workdir", str(workdir), *args]


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("api", ["refuses connections", "accepts and never answers"])
def test_an_unreachable_prefect_api_url_is_one_line_in_seconds(tmp_path: Path, api: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if api == "accepts and never answers":
            listener.listen(4)  # the kernel completes the handshake; nothing ever reads or replies
        else:
            listener.close()
        url = f"http://127.0.0.1:{port}/api"
        env = dict(os.environ, PREFECT_API_URL=url, PREFECT_API_REQUEST_TIMEOUT="2")
        started = time.monotonic()
        proc = subprocess.run(aselect_argv(tmp_path / "w"), cwd=ROOT, env=env, text=True, capture_output=True,
                              timeout=120)
        took = time.monotonic() - started
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    reason = "no answer within 2 s" if api == "accepts and never answers" else "cannot connect (Connection refused)"
    assert last_line(proc.stderr).startswith(f"aselect: error: PREFECT_API_URL {url}: {reason}"), proc.stderr
    assert took < 15, f"took {took:.1f} s"
    assert not (tmp_path / "w").exists()  # refused before anything was written


def _small_file_limit() -> None:
    """In the child before exec: writes past 64 KiB fail with EFBIG, as on a full disk (not a SIGXFSZ kill)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_refused_checkpoint_write_is_one_line(prefect_api_url: str, tmp_path: Path) -> None:
    """The smoke dataset's files are a few KiB and the first pretraining checkpoint some hundreds: its write fails."""
    workdir = tmp_path / "w"
    proc = subprocess.run(aselect_argv(workdir), cwd=ROOT, env=dict(os.environ, PREFECT_API_URL=prefect_api_url),
                          text=True, capture_output=True, timeout=300, preexec_fn=_small_file_limit)
    line = last_line(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (backbone,) = workdir.glob("backbone/*")
    assert line.startswith(f"aselect: error: {backbone}/checkpoints/step-") and ".pt.tmp: " in line, line
    assert line.endswith("finished stages and chunks are kept, rerun to resume"), line
    (ingest,) = workdir.glob("ingest/*")  # what was finished before stays finished
    assert json.loads((ingest / "manifest.json").read_text())["status"] == "complete"
    assert json.loads((backbone / "manifest.json").read_text())["status"] == "partial"


def test_a_full_disk_while_writing_a_manifest_is_one_line(prefect_api_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """The disk fills as the first stage manifest is written: that file's writes go to /dev/full (ENOSPC from the
    kernel) under the manifest's own temporary name. In process (`main`), every byte written to stderr captured."""

    def open_on_a_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if Path(file).name.startswith(".manifest.json.") and "w" in mode:
            raw = io.FileIO(os.open("/dev/full", os.O_WRONLY), "w")
            raw.name = str(file)
            text = io.TextIOWrapper(io.BufferedWriter(raw))
            text.mode = mode  # as open() sets it
            return text
        return open(file, mode, *args, **kwargs)

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    monkeypatch.setattr(stages, "open", open_on_a_full_disk, raising=False)
    workdir = tmp_path / "w"
    capfd.readouterr()
    code = main(["run", "smoke", "--workdir", str(workdir)])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (ingest,) = workdir.glob("ingest/*")
    assert re.fullmatch(rf"aselect: error: {re.escape(str(ingest))}/\.manifest\.json\.\d+\.tmp: No space left on "
                        rf"device; finished stages and chunks are kept, rerun to resume", last_line(err)), err[-3000:]
    assert not (ingest / "manifest.json").exists()  # nothing half-written under the manifest's name


def test_bench_refuses_another_programs_directory_before_writing_to_it(prefect_api_url: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    capfd.readouterr()
    assert main(["bench", "smoke", "--workdir", str(home), "--no-scaling"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and last_line(err).startswith(
        f"aselect: error: {home}: not an aselect workdir (it holds other files"), err[-3000:]
    assert [p.name for p in home.iterdir()] == ["notes.txt"]  # no `bench/` made in it


KEPT = "finished stages and chunks are kept, rerun to resume"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_a_json_file_or_a_checkpoint_is_one_line_naming_it(tmp_path: Path) -> None:
    """The kernel refuses the bytes (ENOSPC from /dev/full) under the temporary names the two writers use."""
    json_tmp = tmp_path / f".metrics.json.{os.getpid()}.tmp"
    json_tmp.symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        stages.write_json_atomic(tmp_path / "metrics.json", {"value": 0.58})
    assert io_failure(caught.value) == f"{json_tmp}: No space left on device; {KEPT}"
    checkpoint_tmp = tmp_path / "step-0000001.pt.tmp"
    checkpoint_tmp.symlink_to("/dev/full")
    with pytest.raises(RuntimeError) as caught:  # torch's writer says so without an errno
        save_checkpoint(tmp_path, "step-0000001.pt", {"weights": list(range(4096))})
    assert io_failure(caught.value) == (f"{checkpoint_tmp}: the write failed (a full disk, a quota, or a failing "
                                        f"device); {KEPT}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_tmp.name, checkpoint_tmp.name])


@pytest.mark.parametrize("code", IO_ERRNOS, ids=lambda code: errno.errorcode[code])
def test_every_refused_write_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         code: int) -> None:
    def refused(source: Any, target: Any) -> None:
        raise OSError(code, os.strerror(code), str(source), str(target))

    monkeypatch.setattr(os, "replace", refused)  # the rename that publishes the file
    with pytest.raises(OSError) as caught:
        stages.write_json_atomic(tmp_path / "selection.json", {"layer": 1})
    line = io_failure(caught.value)
    assert line == f"{tmp_path}/.selection.json.{os.getpid()}.tmp: {os.strerror(code)}; {KEPT}"
    assert io_failure(RuntimeError("wrapped")) is None and io_failure(OSError(errno.ENOENT, "gone")) is None


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT delivered and at its default, as in a shell's foreground job."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_hit(proc: subprocess.Popen[str], hits: Path, name: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if hits.exists() and name in hits.read_text().split():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {name!r} hit before the run ended (exit {proc.poll()})")


@pytest.mark.slow
def test_repeated_ctrl_c_during_calibration_exits_130_with_one_line(prefect_api_url: str, tmp_path: Path) -> None:
    hits = tmp_path / "hits.log"
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url, ASELECT_FAILPOINT_LOG=str(hits))
    # 500 candidate timesteps: calibration runs for many seconds, the first of its items marks that it started
    argv = aselect_argv(tmp_path / "w", "--set", "calibrate.timesteps={start: 0, stop: 1000, step: 2}")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_terminal_sigint)
    try:
        _wait_for_hit(proc, hits, "chunk")
        interrupted = time.monotonic()
        # a user leaning on Ctrl-C: one every 50 ms for 3 s, so some land in every step of the clean-up
        while proc.poll() is None and time.monotonic() - interrupted < 3.0:
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert last_line(err).startswith("aselect: interrupted: rerun to resume"), err[-3000:]
    assert time.monotonic() - interrupted < 30


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_the_temporary_server_ends_with_a_killed_run(new_prefect_home, tmp_path: Path) -> None:
    """SIGKILL of the run alone: its temporary Prefect server exits too, so the run's stderr reaches end-of-file."""
    home, hits = new_prefect_home(tmp_path / "prefect-home"), tmp_path / "hits.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), ASELECT_FAILPOINT_LOG=str(hits))
    proc = subprocess.Popen(aselect_argv(tmp_path / "w", "--set", "backbone.pretrain.steps=400"), cwd=ROOT,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _wait_for_hit(proc, hits, "pretrain")
        servers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                   if _reads(p).count(b"uvicorn") and str(home).encode() in _reads(p.with_name("environ"))]
        assert len(servers) == 1, servers
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.communicate(timeout=30)  # returns at end-of-file on both pipes: nothing holds them open
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 15, f"the run's stderr stayed open {took:.1f} s after the kill"
    deadline = time.monotonic() + 10
    while _alive(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(servers[0]), "the temporary server outlived its run"


def _reads(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
