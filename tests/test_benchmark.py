"""The benchmark's cross-config verdicts: a default chosen leave-one-config-out, and where the probe peaks in t."""

from __future__ import annotations

import json

import pytest

from aselect.pipelines.benchmark import (
    attentive_lines,
    attentive_pairs,
    attentive_report,
    leave_one_config_out,
    leave_one_config_out_by_probe,
    loco_table,
    measured_groups,
    measured_words,
    probe_vs_timestep,
    reused_reports,
)
from aselect.storage.errors import AselectError


def config(name: str, regrets: dict[str, float], pixels: float | None = None) -> dict:
    """A config report with these regrets (oracle value 0.9) and, optionally, a raw-pixel baseline."""
    rows = [{"selector": s, "regret_points": r, "value": round(0.9 - r / 100, 4),
             "label_free": s not in ("oracle", "fewshot", "hybrid")} for s, r in {**regrets, "oracle": 0.0}.items()]
    return {"config": name, "selectors": rows, "baselines": {} if pixels is None else {"pixels": {"value": pixels}}}


def test_each_held_out_config_gets_the_default_chosen_on_the_others() -> None:
    # "steady" is never great and never awful; "spiky" is best on a and b but collapses on c
    configs = [config("a", {"spiky": 0.0, "steady": 2.0, "fewshot": 1.0, "hybrid": 0.0}, pixels=0.85),
               config("b", {"spiky": 0.5, "steady": 2.0, "fewshot": 1.0, "hybrid": 4.0}),
               config("c", {"spiky": 30.0, "steady": 3.0, "fewshot": 1.0, "hybrid": 35.0}, pixels=0.89)]
    loco = leave_one_config_out(configs)
    held = {h["config"]: h for h in loco["held_out"]}
    # without c in view, spiky looks best (worst case 0.5) and costs 30 points on c; with c in view, steady wins
    assert held["c"]["chosen"] == "spiky" and held["c"]["regret_points"] == 30.0
    assert held["a"]["chosen"] == held["b"]["chosen"] == "steady"
    assert (loco["held_out_mean"], loco["held_out_worst"]) == (round((2 + 2 + 30) / 3, 2), 30.0)
    assert loco["shipped"] == "steady" and loco["candidates"][0]["worst"] == 3.0  # in sample: no evidence
    assert [held[c]["beats_pixels"] for c in "abc"] == [True, None, False]
    # the labelled selectors are never candidate defaults; few-shot is reported beside them
    assert {c["selector"] for c in loco["candidates"]} == {"spiky", "steady"}
    assert loco["fewshot"] == {"mean": 1.0, "worst": 1.0, "beats_held_out_default": True}
    assert loco["hybrid"] == {"mean": 13.0, "worst": 35.0, "beats_held_out_default": False}
    text = "\n".join(loco_table(loco))
    assert "Hybrid (HFR's t, the few-shot probe's layer and site at it): mean 13.00, worst 35.00." in text
    assert "| c | spiky | 30.00 | **no** |" in text and "worst 30.00" in text and "**not met**" in text


def test_held_out_regret_is_also_reported_per_backbone_family() -> None:
    configs = [config("a", {"x": 0.0, "y": 1.0}), config("b", {"x": 0.5, "y": 1.0}),
               config("m", {"x": 9.0, "y": 2.0}), config("n", {"x": 0.0, "y": 4.0})]
    for c, family in zip(configs, ("dit", "dit", "sd3", "sd3"), strict=True):
        c["grid"] = {"family": family}
    loco = leave_one_config_out(configs)
    held = {h["config"]: (h["family"], h["chosen"], h["regret_points"]) for h in loco["held_out"]}
    # each default is chosen on all other configs, whatever their family
    assert held == {"a": ("dit", "y", 1.0), "b": ("dit", "y", 1.0), "m": ("sd3", "x", 9.0), "n": ("sd3", "y", 4.0)}
    assert loco["per_family"] == {"dit": {"configs": 2, "held_out_mean": 1.0, "held_out_worst": 1.0},
                                  "sd3": {"configs": 2, "held_out_mean": 6.5, "held_out_worst": 9.0}}
    text = "\n".join(loco_table(loco))
    assert "DiT, DDPM (2 configs) mean 1.00, worst 1.00; MMDiT, flow (2 configs) mean 6.50, worst 9.00" in text


def test_leave_one_config_out_needs_two_configs_and_a_shared_candidate() -> None:
    assert leave_one_config_out([config("a", {"x": 1.0})]) is None
    assert leave_one_config_out([config("a", {"x": 1.0}), config("b", {"y": 1.0})]) is None
    ties = leave_one_config_out([config("a", {"y": 1.0, "x": 1.0}), config("b", {"x": 1.0, "y": 1.0})])
    assert ties["shipped"] == "x"  # equal regrets: by name, so reruns ship the same default


def rows(scores: dict[int, list[float]]) -> list[dict]:
    return [{"timestep": t, "layer": layer, "site": "block", "scorer": "probe", "score": s}
            for t, per_layer in scores.items() for layer, s in enumerate(per_layer)]


@pytest.mark.parametrize(("scores", "peak", "interior"), [
    ({0: [0.90, 0.80], 100: [0.85, 0.95], 500: [0.60, 0.70]}, 100, True),   # the best layer peaks mid-grid
    ({0: [0.90, 0.95], 100: [0.85, 0.94], 500: [0.60, 0.70]}, 0, False),    # falls with t
    ({0: [0.90, 0.80], 100: [0.902, 0.80], 500: [0.60, 0.70]}, 100, False),  # a bump below the margin
    ({0: [0.50], 100: [0.70], 500: [0.90]}, 500, False),                    # rises to the last t
])
def test_probe_vs_timestep_finds_an_interior_maximum(scores: dict, peak: int, interior: bool) -> None:
    profile = probe_vs_timestep(rows(scores))
    assert (profile["best_timestep"], profile["interior_maximum"]) == (peak, interior)
    assert profile["score_at_smallest_t"] == max(scores[0])
    assert probe_vs_timestep(rows({0: [0.5], 100: [0.6]})) is None  # two timesteps have no interior


@pytest.mark.parametrize(("images", "own_curve"), [("64", True), ("32", False), ("auto", False)])
def test_the_confidence_curve_comes_from_one_calibration_of_its_largest_c(images: str, own_curve: bool) -> None:
    from aselect.pipelines.benchmark import selectors
    from aselect.pipelines.config import load_config

    cfg = load_config("smoke", [f"calibrate.images={images}"])  # smoke's curve: C in 16, 32, 64
    chosen = {s.name: s for s in selectors(cfg, depth=2)}
    assert chosen["aselect"].curve is own_curve
    if own_curve:
        assert "aselect-c64" not in chosen
    else:  # a calibration of 64 images for the curve alone, not capped by the budget
        extra = chosen["aselect-c64"]
        assert extra.curve and {"calibrate.images=64", "calibrate.budget=null"} <= set(extra.overrides)
    assert sum(s.curve for s in chosen.values()) == 1
    # few-shot calibrates a fixed C: `auto` reads as calibrate.images_max (256)
    assert chosen["fewshot"].label.startswith(f"few-shot probe on the {256 if images == 'auto' else images} ")


def test_the_attentive_protocol_probes_the_oracle_grid_and_the_default_and_says_what_it_changes() -> None:
    rows = [{"selector": "oracle", "timestep": 0, "layer": 3, "site": "mlp", "value": 0.90},
            {"selector": "aselect", "timestep": 40, "layer": 2, "site": "block", "value": 0.85},
            {"selector": "fixed", "timestep": 100, "layer": 3, "site": "mlp", "value": 0.80},
            {"selector": "rankme", "timestep": 700, "layer": 1, "site": "attn", "value": 0.70}]
    pairs = attentive_pairs([100, 0, 50, 100], rows)
    # the grid at the linear oracle's layer and site (its own t among them), the default's pair, then every other
    # selector's pair (one already on the grid is probed once)
    assert [(p["timestep"], p["layer"], p["site"], p["roles"]) for p in pairs] == [
        (0, 3, "mlp", ["grid", "linear oracle"]), (50, 3, "mlp", ["grid"]), (100, 3, "mlp", ["grid", "fixed"]),
        (40, 2, "block", ["default"]), (700, 1, "attn", ["rankme"])]
    values = {0: 0.91, 50: 0.95, 100: 0.93, 40: 0.92, 700: 0.60}  # attentive: an interior peak at t=50
    runs = [{**p, "value": values[p["timestep"]], "forward_passes": 1000, "compute_seconds": 10.0} for p in pairs]
    report = attentive_report(runs, rows, epochs=3, calibration={"forward_passes": 500, "compute_seconds": 5.0})
    assert report["oracle"] == {"timestep": 50, "layer": 3, "site": "mlp", "value": 0.95}
    assert report["profile"]["interior_maximum"] and report["profile"]["best_timestep"] == 50
    assert (report["regret_points"], report["linear_regret_points"]) == (3.0, 5.0)
    assert report["selectors"] == {"oracle": {"value": 0.91, "regret_points": 4.0},
                                   "aselect": {"value": 0.92, "regret_points": 3.0},
                                   "fixed": {"value": 0.93, "regret_points": 2.0},
                                   "rankme": {"value": 0.60, "regret_points": 35.0}}
    assert report["cost_ratio"] == {"probe_trainings": 3, "forward_passes": 2.0, "compute_seconds": 2.0}
    linear = {p["timestep"]: p["linear_value"] for p in report["pairs"]}
    assert linear == {0: 0.90, 50: None, 100: 0.80, 40: 0.85, 700: 0.70}
    text = "\n".join(attentive_lines({"attentive": report}))
    assert "t=40 layer 2 block 0.8500 -> 0.9200" in text and "t=50 layer 3 mlp n/a -> 0.9500" in text
    assert "attentive oracle (the best pair probed) t=50 layer 3 mlp 0.9500" in text
    assert "regret 3.00 points attentive, 5.00 linear" in text
    assert attentive_lines({"attentive": None}) == []


def test_the_default_is_also_chosen_leave_one_config_out_under_the_attentive_probe_and_the_worse_of_both() -> None:
    # linear: x is best everywhere; attentive: x collapses on b, y holds
    attentive = {"a": {"x": 0.0, "y": 1.0}, "b": {"x": 20.0, "y": 2.0}, "c": {"x": 0.5, "y": 1.5}}
    configs = []
    for name in "abc":
        c = config(name, {"x": 0.0, "y": 3.0}, pixels=0.5)
        c["attentive"] = {"selectors": {s: {"value": round(0.95 - r / 100, 4), "regret_points": r}
                                        for s, r in attentive[name].items()}}
        configs.append(c)
    configs.append(config("d", {"x": 0.0, "y": 3.0}))  # no attentive rows: left out of both views
    linear = leave_one_config_out(configs)
    by_probe = leave_one_config_out_by_probe(configs)
    assert linear["held_out_worst"] == 0.0 and linear["shipped"] == "x"
    held = {h["config"]: (h["chosen"], h["regret_points"], h["beats_pixels"])
            for h in by_probe["attentive"]["held_out"]}
    # without b in view, x looks best under the attentive probe and costs 20 points on b; no pixel baseline there
    assert held == {"a": ("y", 1.0, None), "b": ("x", 20.0, None), "c": ("y", 1.5, None)}
    worst = {h["config"]: (h["chosen"], h["regret_points"]) for h in by_probe["worst of both"]["held_out"]}
    assert worst == {"a": ("y", 3.0), "b": ("x", 20.0), "c": ("y", 3.0)}
    assert by_probe["worst of both"]["shipped"] == "y"
    text = "\n".join(loco_table(by_probe["attentive"], "the attentive probe"))
    assert text.startswith("### Choosing the default leave-one-config-out, under the attentive probe")
    assert leave_one_config_out_by_probe(configs[3:]) == {"attentive": None, "worst of both": None}


def results(generated: str, code: str, names: list[str]) -> dict:
    """A benchmark results file's content: its header and one bare report per config name."""
    return {"generated": generated, "machine": {"cores": 2, "device": "no GPU", "torch": "x", "python": "3"},
            "bench_code": code, "command": f"aselect bench {' '.join(names)}",
            "configs": [{"config": n, "selectors": []} for n in names]}


def test_reused_reports_are_stamped_with_the_run_that_measured_them(tmp_path) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(results("2026-01-02T03:04:05+00:00", "a" * 16, ["digits", "shapes"])))
    second.write_text(json.dumps(results("2026-02-03T00:00:00+00:00", "b" * 16, ["mnist5k"])))
    reused = reused_reports([first, second])
    assert list(reused) == ["digits", "shapes", "mnist5k"]
    assert reused["digits"]["measured"]["bench_code"] == "a" * 16
    assert reused["mnist5k"]["measured"]["generated"].startswith("2026-02-03")
    # a page of configs from two runs names each run, its configs, date and code
    page = {**results("2026-03-01T00:00:00+00:00", "c" * 16, []), "configs": list(reused.values())}
    groups = measured_groups(page)
    assert [names for _, names in groups] == [["digits", "shapes"], ["mnist5k"]]
    words = measured_words(page)
    assert words.startswith("Measured by 2 runs: digits, shapes on 2 CPU cores, no GPU, 2026-01-02 (`aselect bench "
                            "digits shapes`)") and "mnist5k on 2 CPU cores, no GPU, 2026-02-03" in words
    assert "Assembled on 2026-03-01" in words
    # one run: the page says where and when, as before
    single = results("2026-03-01T00:00:00+00:00", "c" * 16, ["digits"])
    assert measured_words(single) == "Measured on 2 CPU cores, no GPU, 2026-03-01"


@pytest.mark.parametrize("content, words", [
    ("{not json", "cannot read benchmark results to reuse"),
    ('{"configs": []}', "not benchmark results"),
    (None, "cannot read benchmark results to reuse (FileNotFoundError"),
])
def test_a_results_file_that_cannot_be_reused_is_one_line_naming_it(tmp_path, content: str | None,
                                                                    words: str) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AselectError) as err:
        reused_reports([path])
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value) and "\n" not in str(err.value)


def test_a_config_in_two_reused_files_is_refused(tmp_path) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(results("2026-01-02T00:00:00+00:00", "a" * 16, ["digits"])))
    second.write_text(json.dumps(results("2026-01-03T00:00:00+00:00", "b" * 16, ["shapes", "digits"])))
    with pytest.raises(AselectError, match=r"second.json: config 'digits' is also in .*first.json"):
        reused_reports([first, second])


def test_a_kept_config_report_is_reused_only_while_it_matches_its_checksum(tmp_path) -> None:
    from aselect.flows.benchmark import REPORT_CHECKSUM, _read_checked
    from aselect.storage.stages import self_digest

    report = {"config": "digits", "selectors": [{"value": 0.9778, "score": float("nan")}]}
    kept = tmp_path / "digits-0123456789abcdef.json"
    kept.write_text(json.dumps(report | {REPORT_CHECKSUM: self_digest(report)}))
    again = _read_checked(kept)
    assert again is not None and again["selectors"][0]["value"] == 0.9778 and REPORT_CHECKSUM not in again
    kept.write_text(kept.read_text().replace("0.9778", "0.9779"))  # one digit: same size, another number
    assert _read_checked(kept) is None
    kept.write_text(json.dumps(report))  # no checksum: written by something else
    assert _read_checked(kept) is None
    kept.write_text('{"config": "dig')  # torn
    assert _read_checked(kept) is None
