"""A-SelecT vs the exhaustive oracle, per HFR feature variant, on bundled configs.

    .venv/bin/python bench/hfr_variants.py [CONFIG ...] [--workdir DIR] [--json OUT]

For each config: runs the exhaustive flow (oracle), then the A-SelecT flow once per HFR feature
(attention maps, and token maps of block / attn / mlp), all in one workdir so shared stages are cached.
Prints per variant the selected pair, its test metric, regret against the oracle (points), and the
Spearman correlation over the grid between calibration HFR and the oracle's probe score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from scipy.stats import spearmanr  # noqa: E402

from flows.pipeline import aselect_exhaustive, aselect_pipeline  # noqa: E402
from pipelines.plots import metric_vs_timestep  # noqa: E402

VARIANTS = ["attn_map", "block", "attn", "mlp"]


def rows_of(result: dict, stage: str, filename: str) -> list[dict]:
    path = next(Path(s["path"]) for s in result["stages"] if s["name"] == stage)
    return json.loads((path / filename).read_text())


def spearman(hfr_rows: list[dict], probe_rows: list[dict], site: str) -> float:
    """Rank correlation over (t, l) between HFR of `site` and the probe score of that site (else of `block`)."""
    probed = {r["site"] for r in probe_rows}
    probe_site = site if site in probed else "block"
    probe = {(r["timestep"], r["layer"]): r["score"] for r in probe_rows if r["site"] == probe_site}
    pairs = [(r["score"], probe[(r["timestep"], r["layer"])]) for r in hfr_rows
             if r["site"] == site and (r["timestep"], r["layer"]) in probe]
    if len(pairs) < 3:
        return float("nan")
    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def run_config(config: str, workdir: str) -> dict:
    started = time.perf_counter()
    oracle = aselect_exhaustive(config=config, workdir=workdir)
    oracle_seconds = time.perf_counter() - started
    probe_rows = rows_of(oracle, "score", "scores.json")
    out = {"config": config, "oracle": {**_pick(oracle), "seconds": round(oracle_seconds, 1),
                                        "compute_seconds": oracle["cost"]["compute_seconds"],
                                        "forward_passes": oracle["cost"]["forward_passes"]}, "variants": []}
    sites = f"calibrate.sites=[{','.join(VARIANTS)}]"
    for site in VARIANTS:
        started = time.perf_counter()
        result = aselect_pipeline(config=config, workdir=workdir, overrides=[sites, f"select.hfr_site={site}"])
        hfr_rows = rows_of(result, "score", "scores.json")
        picked = _pick(result)
        out["variants"].append({
            "hfr_site": site, **picked, "seconds": round(time.perf_counter() - started, 1),
            "regret_points": round(100 * (out["oracle"]["value"] - picked["value"]), 2),
            "spearman_hfr_vs_probe": round(spearman(hfr_rows, probe_rows, site), 3),
            "forward_passes": result["cost"]["forward_passes"],
            "compute_seconds": result["cost"]["compute_seconds"],
        })
        if site == "attn_map":  # the probe score over t per block, with the HFR it is selected by
            pictures = Path(workdir) / "bench"
            pictures.mkdir(parents=True, exist_ok=True)
            scorer = probe_rows[0]["scorer"]
            out["curves"] = str(metric_vs_timestep(probe_rows, hfr_rows, pictures / f"{config}-metric-vs-t.png",
                                                   metric_site="block", hfr_site=site, metric_name=scorer))
    return out


def _pick(result: dict) -> dict:
    sel, met = result["selection"], result["metrics"]
    return {"timestep": sel["timestep"], "layer": sel["layer"], "site": sel["site"], "metric": met["metric"],
            "value": round(float(met["value"]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["digits", "shapes"])
    parser.add_argument("--workdir", default="aselect-work")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = [run_config(config, args.workdir) for config in args.configs]
    for r in results:
        o = r["oracle"]
        print(f"\n{r['config']}: oracle t={o['timestep']} block {o['layer']} {o['site']}: "
              f"{o['metric']} {o['value']:.4f}  ({o['forward_passes']} forward passes, "
              f"{o['compute_seconds']:.0f} s compute)")
        print(f"  {'HFR on':<9} {'pair':<22} {o['metric']:>7} {'regret':>7} {'spearman':>9}")
        for v in r["variants"]:
            pair = f"t={v['timestep']} block {v['layer']} {v['site']}"
            print(f"  {v['hfr_site']:<9} {pair:<22} {v['value']:>7.4f} {v['regret_points']:>6.2f}p "
                  f"{v['spearman_hfr_vs_probe']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
