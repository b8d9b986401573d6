"""The `aselect-benchmark` flow: both paths on each config, regret and cost side by side, regressions flagged.

Results go to `<workdir>/bench/results.json`, `results.md` and `cost-vs-regret.png` (the previous run's file is kept as
`previous.json` and compared against) and to the `benchmark-results` markdown artifact.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import aselect_exhaustive, aselect_pipeline
from pipelines.plots import cost_vs_regret
from storage.stages import Workdir, write_json_atomic

REGRESSION_POINTS = 1.0  # a metric drop larger than this (in points) against the previous run is flagged


def compare(config: str, aselect: dict[str, Any], oracle: dict[str, Any]) -> dict[str, Any]:
    """One results row: the two selections, their metrics, regret and cost ratio."""
    a_cost, o_cost = aselect["cost"], oracle["cost"]
    return {
        "config": config, "metric": aselect["metrics"]["metric"],
        "aselect": {k: aselect["selection"][k] for k in ("timestep", "layer", "site")}
        | {"value": aselect["metrics"]["value"], **a_cost},
        "oracle": {k: oracle["selection"][k] for k in ("timestep", "layer", "site")}
        | {"value": oracle["metrics"]["value"], **o_cost},
        "regret_points": round(100 * (oracle["metrics"]["value"] - aselect["metrics"]["value"]), 2),
        "cost_ratio_forward_passes": round(o_cost["forward_passes"] / max(a_cost["forward_passes"], 1), 2),
        "cost_ratio_seconds": round(o_cost["compute_seconds"] / max(a_cost["compute_seconds"], 1e-9), 2),
    }


def flag_regressions(rows: list[dict[str, Any]], previous: list[dict[str, Any]]) -> list[str]:
    """Lines naming every config whose A-SelecT metric fell by more than REGRESSION_POINTS."""
    before = {r["config"]: r for r in previous}
    flags = []
    for row in rows:
        old = before.get(row["config"])
        if old and 100 * (old["aselect"]["value"] - row["aselect"]["value"]) > REGRESSION_POINTS:
            flags.append(f"{row['config']}: {row['metric']} {old['aselect']['value']:.4f} -> "
                         f"{row['aselect']['value']:.4f}")
    return flags


def to_markdown(rows: list[dict[str, Any]], flags: list[str]) -> str:
    lines = ["| config | metric | A-SelecT pair | A-SelecT | oracle pair | oracle | regret (pts) | cost ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a, o = r["aselect"], r["oracle"]
        lines.append(f"| {r['config']} | {r['metric']} | t={a['timestep']} l={a['layer']} {a['site']} | "
                     f"{a['value']:.4f} | t={o['timestep']} l={o['layer']} {o['site']} | {o['value']:.4f} | "
                     f"{r['regret_points']:.2f} | {r['cost_ratio_forward_passes']}x passes, "
                     f"{r['cost_ratio_seconds']}x seconds |")
    lines.append("")
    lines.append("Regressions: " + ("; ".join(flags) if flags else "none"))
    return "\n".join(lines) + "\n"


@flow(name="aselect-benchmark")
def aselect_benchmark(configs: list[str] | None = None, workdir: str | None = None) -> dict[str, Any]:
    """Run both paths on each config, write the results table and flag regressions."""
    logger = get_run_logger()
    rows = []
    for config in configs or ["smoke"]:
        started = time.perf_counter()
        picked = aselect_pipeline(config=config, workdir=workdir)
        oracle = aselect_exhaustive(config=config, workdir=workdir)
        rows.append(compare(config, picked, oracle) | {"wall_seconds": round(time.perf_counter() - started, 1)})
        work = Workdir(picked["workdir"])
    out = work.root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    results, previous_path = out / "results.json", out / "previous.json"
    previous = json.loads(results.read_text()) if results.exists() else []
    if results.exists():
        results.replace(previous_path)
    flags = flag_regressions(rows, previous)
    write_json_atomic(results, rows)
    picture = cost_vs_regret(rows, out / "cost-vs-regret.png")
    markdown = to_markdown(rows, flags) + f"\nPicture: {picture}\n"
    (out / "results.md").write_text(markdown)
    create_markdown_artifact(key="benchmark-results", markdown=markdown, description="A-SelecT vs exhaustive")
    for flag in flags:
        logger.warning("regression: %s", flag)
    return {"rows": rows, "regressions": flags, "results": str(results)}


if __name__ == "__main__":
    aselect_benchmark()
