"""A-SelecT's cost against the exhaustive search as the dataset grows: forward passes and compute seconds.

    .venv/bin/python bench/calibration_cost.py [--config digits] [--sizes 200,500,1000,all]
                                               [--images auto,config] [--oracle-grid dump|calibrate]
                                               [--workdir W] [--json out.json]

Trains (or reuses) the config's backbone on its full dataset once, then for each dataset size N (`ingest.limit`,
a stratified subset; `all`: the whole dataset) runs, on that same backbone:

- the A-SelecT flow with each `calibrate.images` asked for (`auto`: rounds until the choice is stable; `config`:
  the config's own value), and
- the exhaustive flow (`--exhaustive`: every image at every `dump.timesteps`, or at every candidate timestep of
  A-SelecT with `--oracle-grid calibrate`, a probe per pair),

and prints, per N, the forward passes and compute seconds of each (from the runs' `--json` cost fields, which
leave out ingest and the backbone), their ratios, what calibration spent (C, timesteps scored, why it stopped),
the selected pair and its metric. Every figure comes from this one invocation on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aselect.pipelines.config import load_config  # noqa: E402
from aselect.storage.stages import StageRef  # noqa: E402
from aselect.tasks.backbone import ModelInfo  # noqa: E402


def aselect(workdir: Path, config: str, *overrides: str, exhaustive: bool = False) -> dict[str, Any]:
    """One `aselect run CONFIG --json` in its own process; its summary."""
    argv = [sys.executable, "-m", "aselect", "run", config, "--workdir", str(workdir), "--json"]
    argv += ["--exhaustive"] if exhaustive else []
    for override in overrides:
        argv += ["--set", override]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1"))
    if proc.returncode != 0:
        sys.exit(f"calibration_cost: `aselect run {config} {' '.join(argv[6:])}` failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """What one run picked, scored and cost."""
    sel, cost = summary["selection"], summary["cost"]
    spent = sel.get("calibration") or {}
    return {"pair": f"t={sel['timestep']} layer {sel['layer']} {sel['site']}",
            "value": round(float(summary["metrics"]["value"]), 4), "metric": summary["metrics"]["metric"],
            "forward_passes": cost["forward_passes"], "compute_seconds": cost["compute_seconds"],
            "calibration": {k: spent.get(k) for k in ("images", "rounds", "stopped", "ceiling", "capped",
                                                       "timesteps_scored", "timesteps_candidates", "forward_passes",
                                                       "budget")} if spent else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits")
    parser.add_argument("--sizes", default="200,500,1000,all", help="dataset sizes N (ingest.limit), or `all`")
    parser.add_argument("--images", default="auto,config", help="calibrate.images values: auto, config, integers")
    parser.add_argument("--workdir", default=str(ROOT / "aselect-work" / "calibration-cost"))
    parser.add_argument("--oracle-grid", choices=("dump", "calibrate"), default="dump",
                        help="the exhaustive search's timesteps: dump.timesteps (what `--exhaustive` runs), or "
                             "A-SelecT's candidates (calibrate.timesteps, the benchmark's oracle)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    cfg = load_config(args.config)
    grid = [] if args.oracle_grid == "dump" else [
        "dump.timesteps=[" + ",".join(map(str, cfg.calibrate.candidate_timesteps(cfg.dump))) + "]"]

    # 1. the backbone, trained once on the whole dataset (by the cheapest run there is: one fixed pair)
    full = aselect(workdir, args.config, "select.policy=fixed", "select.timestep=0", "select.layer=0",
                   "select.site=block")
    model = next(s for s in full["stages"] if s["name"] == "backbone")
    model_dir = ModelInfo.of(StageRef(model["name"], model["key"], model["path"])).path
    on_backbone = ["backbone.kind=load", f"backbone.path={model_dir}", "backbone.latent=null"]

    # 2. per N: A-SelecT with each calibration size asked for, and the exhaustive search, on that backbone
    report: dict[str, Any] = {"config": args.config, "oracle_grid": args.oracle_grid,
                              "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                              "date": datetime.now(UTC).date().isoformat(), "sizes": []}
    for size in args.sizes.split(","):
        limit = [] if size == "all" else [f"ingest.limit={int(size)}"]
        exhaustive = row(aselect(workdir, args.config, *on_backbone, *limit, *grid, exhaustive=True))
        point: dict[str, Any] = {"limit": size, "exhaustive": exhaustive, "aselect": {}}
        for images in args.images.split(","):
            asked = [] if images == "config" else [f"calibrate.images={images}"]
            cheap = row(aselect(workdir, args.config, *on_backbone, *limit, *asked))
            cheap["ratio"] = {k: round(exhaustive[k] / cheap[k], 2) if cheap[k] else None
                              for k in ("forward_passes", "compute_seconds")}
            point["aselect"][images] = cheap
        report["sizes"].append(point)
        for images, cheap in point["aselect"].items():
            spent = cheap["calibration"] or {}
            print(f"N={size:>5} images={images:<6} A-SelecT {cheap['forward_passes']:>7} passes "
                  f"{cheap['compute_seconds']:>7.1f} s ({cheap['pair']}, {cheap['value']:.4f}; C={spent.get('images')} "
                  f"{spent.get('stopped')}, {spent.get('timesteps_scored')}/{spent.get('timesteps_candidates')} t) | "
                  f"exhaustive {exhaustive['forward_passes']:>7} passes {exhaustive['compute_seconds']:>7.1f} s "
                  f"({exhaustive['pair']}, {exhaustive['value']:.4f}) | ratio {cheap['ratio']['forward_passes']}x "
                  f"passes, {cheap['ratio']['compute_seconds']}x seconds", flush=True)
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
