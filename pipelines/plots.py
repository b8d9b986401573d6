"""Pictures of a run: score heatmaps over (timestep, layer) per site, and metric-vs-t curves with HFR."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _grid(rows: Sequence[dict], scorer: str, site: str) -> tuple[list[int], list[int], np.ndarray]:
    """(timesteps, layers, scores[layer, timestep]) of one scorer and site; NaN where missing."""
    picked = [r for r in rows if r["scorer"] == scorer and r["site"] == site]
    timesteps = sorted({int(r["timestep"]) for r in picked})
    layers = sorted({int(r["layer"]) for r in picked})
    grid = np.full((len(layers), len(timesteps)), np.nan)
    for r in picked:
        grid[layers.index(int(r["layer"])), timesteps.index(int(r["timestep"]))] = float(r["score"])
    return timesteps, layers, grid


def score_heatmaps(rows: Sequence[dict], out_dir: Path, chosen: dict | None = None) -> list[Path]:
    """One PNG per (scorer, site): score over timestep x layer, the chosen pair marked."""
    paths = []
    for scorer, site in sorted({(r["scorer"], r["site"]) for r in rows}):
        timesteps, layers, grid = _grid(rows, scorer, site)
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(timesteps), 1.2 + 0.45 * len(layers)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        ax.set_xticks(range(len(timesteps)), [str(t) for t in timesteps], rotation=45)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("timestep t")
        ax.set_ylabel("layer l")
        ax.set_title(f"{scorer} ({site})")
        fig.colorbar(image, ax=ax)
        if chosen and chosen.get("timestep") in timesteps and chosen.get("layer") in layers:
            ax.scatter([timesteps.index(chosen["timestep"])], [layers.index(chosen["layer"])], marker="*",
                       s=160, c="red", label="selected")
            ax.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
        path = out_dir / f"heatmap-{scorer}-{site}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def metric_vs_timestep(metric_rows: Sequence[dict], hfr_rows: Sequence[dict], path: Path, metric_site: str,
                       hfr_site: str, metric_name: str = "probe") -> Path:
    """Metric vs t per layer (solid) with HFR per layer overlaid on a second axis (dashed)."""
    timesteps, layers, metric = _grid(metric_rows, metric_name, metric_site)
    hfr_t, hfr_layers, hfr = _grid(hfr_rows, "hfr", hfr_site)
    fig, ax = plt.subplots(figsize=(7, 4))
    twin = ax.twinx()
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(layers), 1)))
    for i, layer in enumerate(layers):
        ax.plot(timesteps, metric[i], "-o", color=colors[i], label=f"{metric_name} layer {layer}", markersize=3)
        if layer in hfr_layers:
            twin.plot(hfr_t, hfr[hfr_layers.index(layer)], "--", color=colors[i], alpha=0.7)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("timestep t")
    ax.set_ylabel(f"{metric_name} ({metric_site})")
    twin.set_ylabel(f"HFR ({hfr_site}, dashed)")
    ax.legend(fontsize="x-small", loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cost_vs_regret(configs: Sequence[dict], path: Path) -> Path:
    """Benchmark picture: per config and selector, regret (points) against cost relative to the exhaustive grid."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*X"
    names = sorted({r["selector"] for c in configs for r in c["selectors"]})
    colors = plt.cm.tab10(np.arange(len(configs)) % 10)
    for ci, c in enumerate(configs):
        for r in c["selectors"]:
            ratio = r["cost_ratio"]["compute_seconds"]
            if not ratio:
                continue
            # Hollow markers: selectors that pick the same pair sit on one spot and stay readable.
            ax.scatter(1.0 / ratio, r["regret_points"], s=60, facecolors="none", edgecolors=colors[ci],
                       linewidths=1.5, marker=markers[names.index(r["selector"]) % len(markers)])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.axvline(1.0 / 21, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)  # regrets span 0 to ~100 points; the goal region is below 1
    worst = max((r["regret_points"] or 0.0 for c in configs for r in c["selectors"]), default=1.0)
    ax.set_ylim(-0.05, max(worst, 1.0) * 2.0)
    ax.set_xlabel("compute seconds / exhaustive grid's (dotted: 1/21)")
    ax.set_ylabel("regret vs oracle (points; dashed: 1)")
    # Two legends instead of per-point labels, which overlap where selectors coincide.
    by_config = [plt.Line2D([], [], color=colors[ci], marker="o", linestyle="", label=c["config"])
                 for ci, c in enumerate(configs)]
    by_selector = [plt.Line2D([], [], color="black", marker=markers[i % len(markers)], linestyle="",
                              markerfacecolor="none", label=name) for i, name in enumerate(names)]
    first = ax.legend(handles=by_config, fontsize="small", title="config", loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=by_selector, fontsize="small", title="selector", loc="lower left", bbox_to_anchor=(1.01, 0.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curve(curve: Sequence[Sequence[float]], path: Path, metric: str, best_epoch: int | None = None) -> Path:
    """The attentive probe's training loss and validation score per epoch, the kept epoch marked."""
    epochs = [int(c[0]) for c in curve]
    fig, loss_ax = plt.subplots(figsize=(5.5, 3.2))
    loss_ax.plot(epochs, [float(c[1]) for c in curve], color="tab:blue", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss", color="tab:blue")
    score_ax = loss_ax.twinx()
    score_ax.plot(epochs, [float(c[2]) for c in curve], color="tab:orange", marker=".", label=f"validation {metric}")
    score_ax.set_ylabel(f"validation {metric}", color="tab:orange")
    if best_epoch is not None:
        score_ax.axvline(best_epoch, color="grey", linestyle=":", label="kept")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
