"""The `aselect` command as a user runs it: real subprocesses against the session's Prefect server (or Prefect's
temporary one), JSON on stdout, one-line errors, `inspect`, and `aselect bench` on the smoke config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aselect.flows.benchmark import BENCH_WORK
from aselect.pipelines.benchmark import README_END, README_START, readme_section

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
    assert list(rows) == ["aselect", "aselect-attn_map", "aselect-plain", "aselect-published", "fewshot", "rankme",
                          "fixed", "oracle"]
    oracle = rows["oracle"]
    for row in rows.values():
        assert row["regret_points"] == pytest.approx(100 * (oracle["value"] - row["value"]), abs=0.01)
        assert row["cost_ratio"]["forward_passes"] == pytest.approx(
            oracle["forward_passes"] / row["forward_passes"], abs=0.01)
    # forward passes are images x timesteps: 200 images, 64 calibration images, and the oracle searches the
    # same 10 candidate timesteps as A-SelecT (calibrate.timesteps), not the 4 of dump.timesteps
    # the default noise_relative signal runs each calibration image and its noise-only twin; plain runs the image
    assert oracle["forward_passes"] == 200 * 10 and rows["aselect"]["forward_passes"] == 2 * 64 * 10 + 200
    assert rows["aselect-plain"]["forward_passes"] == 64 * 10 + 200
    assert (rows["fixed"]["timestep"], rows["fixed"]["layer"], rows["fixed"]["site"]) == (100, 1, "block")
    assert rows["fixed"]["forward_passes"] == 200 and rows["fewshot"]["site"] in ("block", "attn", "mlp")
    assert "spearman_hfr_vs_probe" in rows["aselect-attn_map"] and "spearman_hfr_vs_probe" not in rows["fixed"]
    assert rows["aselect"]["cached_stages"] == 0 and oracle["cached_stages"] == 0  # measured in this run
    goals = config["goals"]
    assert goals["regret"]["met"] == (rows["aselect"]["regret_points"] <= 1.0)
    assert goals["cost"]["measured"] == rows["aselect"]["cost_ratio"]["compute_seconds"]
    assert goals["cost_forward_passes"]["measured"] == rows["aselect"]["cost_ratio"]["forward_passes"]
    # the forward-pass ratio of A-SelecT is exactly the grid's ceiling T*N / (K*C*T + N)
    assert config["grid"] == {"family": "dit", "timesteps": 10, "oracle_timesteps": 10, "images": 200,
                              "calibration_images": 64, "calibration_inputs": 2}
    # the published configuration: plain HFR of query (one input per image), features query of block 9/24 of 2
    published = rows["aselect-published"]
    assert (published["layer"], published["site"]) == (1, "query")
    assert published["forward_passes"] == 64 * 10 + 200
    assert goals["cost"]["forward_pass_ceiling"] == rows["aselect"]["cost_ratio"]["forward_passes"] == round(
        10 * 200 / (2 * 64 * 10 + 200), 2)
    # confidence vs C, bootstrapped from the default selector's 64 calibration images
    curve = config["confidence_curve"]
    assert [p["images"] for p in curve] == [16, 32, 64]
    assert curve[-1]["confidence"] == rows["aselect"]["confidence"] and curve[-1]["agrees"] == 1.0
    assert [p["subsets"] for p in curve] == [8, 8, 1] and all(0.0 <= p["timestep"] <= 1.0 for p in curve)
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
    assert json.loads(rerun.stdout)["configs"] == report["configs"] == [json.loads(kept.read_text())]
    assert "bench smoke: finished in an earlier run" in rerun.stderr  # nothing was measured again
