"""`probe.kind: attentive` through the whole pipeline, against the session's Prefect server: the `aselect run` CLI,
the head saved in the probe stage and read back, one `dump` stage per noise draw, a cached rerun, a damaged head
retrained, the exhaustive flow's oracle pair, a SIGKILL during training resumed to the same head, one-line config
errors, and a tiny segmentation run.

Every run pins the pretraining threads (`backbone.threads=1`) and trains the head for a few epochs only. The probe
stage has no thread setting of its own: it trains with the process's torch threads, so the runs here get one (in this
process, and OMP_NUM_THREADS=1 for the CLI's): with two on a busy 2-core host, 4 epochs took 18 s instead of 2 s."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aselect.pipelines.attentive import load_head
from aselect.pipelines.config import load_config
from aselect.pipelines.probe import EVAL_BATCH
from aselect.pipelines.threads import torch_threads
from aselect.storage.datasets import read_split
from aselect.storage.errors import AselectError
from aselect.storage.features import PairReader, open_features
from aselect.storage.stages import Workdir

ROOT = Path(__file__).resolve().parent.parent
ATTENTIVE = ["backbone.threads=1", "probe.kind=attentive", "probe.epochs=4"]
# a t > 0 pair, so that the noise draw changes the features (and no calibration: the runs stay short)
FIXED = ["select.policy=fixed", "select.timestep=100", "select.layer=1", "select.site=block"]
PAIR = {"timestep": 100, "layer": 1, "site": "block"}


def by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["stages"]}


def manifest(stage: dict | Path) -> dict:
    path = Path(stage["path"]) if isinstance(stage, dict) else stage
    return json.loads((path / "manifest.json").read_text())


def manifests(workdir: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in workdir.glob("*/*/manifest.json")}


def dumps(result: dict) -> list[dict]:
    return [s for s in result["stages"] if s["name"] == "dump"]


def pipeline(workdir: Path, *overrides: str) -> dict:
    from aselect.flows.pipeline import aselect_pipeline

    return aselect_pipeline(config="smoke", overrides=list(overrides), workdir=str(workdir))


def head_top1(head_dir: Path, dataset: Path, draws: list[Path], pair: dict) -> float:
    """Test top-1 of the saved head on the dumped token maps of `draws`, logits averaged over them."""
    head, _ = load_head(head_dir)
    labels, _, test_idx = read_split(dataset)
    total = None
    for draw in draws:
        reader = PairReader(draw, pair["timestep"], pair["layer"], pair["site"], spatial=True)
        position = {int(s): i for i, s in enumerate(reader.samples)}
        maps = reader.read_all()[[position[int(i)] for i in test_idx]]
        with torch.no_grad():
            logits = torch.cat([head(torch.from_numpy(maps[i:i + EVAL_BATCH])) for i in range(0, len(maps),
                                                                                            EVAL_BATCH)])
        total = logits if total is None else total + logits
    return float((total.argmax(dim=1) == torch.from_numpy(labels[test_idx]).long()).float().mean())


def head_tensors(stage: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(stage["path"]) / "head" / "head.safetensors")


def assert_same_head(a: dict, b: dict) -> None:
    ta, tb = head_tensors(a), head_tensors(b)
    assert ta.keys() == tb.keys() and "feature_mean" in ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"head tensor {key} differs"
    assert (Path(a["path"]) / "head" / "head.json").read_text() == (Path(b["path"]) / "head" / "head.json").read_text()


def _cli(api_url: str, workdir: Path, *overrides: str, **env: str) -> subprocess.Popen[str]:
    """`aselect run smoke --json` as its own process group (a failpoint kill takes the whole group), one torch
    thread."""
    args = [sys.executable, "-m", "aselect", "run", "smoke", "--workdir", str(workdir), "--json"]
    for assignment in overrides:
        args += ["--set", assignment]
    env = dict(os.environ, PREFECT_API_URL=api_url, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process runs' probes train with one torch thread (restored after the module)."""
    with torch_threads(1):
        yield


# ---------------------------------------------------------------------------------------------
#                           1. `aselect run smoke --set probe.kind=attentive`
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_attentive(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`aselect run smoke --set probe.kind=attentive` (the A-SelecT policy); the module's other runs add theirs to
    its workdir (they share its ingest and backbone)."""
    workdir = tmp_path_factory.mktemp("attentive-work")
    proc = _cli(prefect_api_url, workdir, *ATTENTIVE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return workdir, json.loads(out)


@pytest.mark.slow
def test_cli_run_with_an_attentive_probe_saves_a_head_that_reproduces_its_top1(
        cli_attentive: tuple[Path, dict]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    workdir, result = cli_attentive
    stages = by_name(result)
    assert [s["name"] for s in result["stages"]] == ["ingest", "backbone", "calibrate", "score", "select", "dump",
                                                     "probe"]
    assert all(s["status"] == "Completed" and not s["cached"] for s in result["stages"]), result
    selection = {k: result["selection"][k] for k in ("timestep", "layer", "site")}
    # the selected pair is dumped as token maps (a linear classification probe reads pooled features only)
    dump = manifest(stages["dump"])
    assert dump["layout"]["spatial"] and dump["inputs"]["config"]["draw"] == 0
    assert (dump["layout"]["timesteps"], dump["layout"]["layers"], dump["layout"]["sites"]) == (
        [selection["timestep"]], [selection["layer"]], [selection["site"]])

    probe_dir = Path(stages["probe"]["path"])
    record = manifest(stages["probe"])
    assert record["status"] == "complete" and record["metric"] == "top1" and 0.0 <= record["value"] <= 1.0
    assert (record["head"], record["curve"], record["probe_fits"]) == ("head", "training.png", 1)
    assert record["inputs"]["upstream"] == {"features": stages["dump"]["key"]}
    assert record["inputs"]["config"]["kind"] == "attentive" and record["inputs"]["config"]["epochs"] == 4
    metrics = json.loads((probe_dir / "metrics.json").read_text())
    assert metrics["metric"] == "top1" and metrics["value"] == record["value"] == result["metrics"]["value"]
    details = metrics["details"]
    assert (details["epochs"], details["draws"], details["resumed_from"], details["fits"]) == (4, 1, 0, 1)
    assert [row[0] for row in details["curve"]] == [1, 2, 3, 4] and 1 <= details["best_epoch"] <= 4
    assert details["val_score"] == max(row[2] for row in details["curve"])
    assert details["tokens"] == 16 and details["classes"] == 10
    assert "attentive probe, best epoch" in stages["probe"]["summary"]

    assert (probe_dir / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (probe_dir / "checkpoints").exists()  # removed once training finished
    head_json = json.loads((probe_dir / "head" / "head.json").read_text())
    assert head_json["selection"] == selection and head_json["task"] == "classification"
    assert (head_json["classes"], head_json["tokens"], head_json["best_epoch"]) == (10, 16, details["best_epoch"])
    head, config = load_head(probe_dir / "head")
    assert config == head_json and head.feature_mean.shape == (config["in_dim"],)
    assert record["files"].keys() >= {"head/head.safetensors", "head/head.json", "training.png", "metrics.json"}

    # the saved head, on the token maps read back from the dump, scores the reported test top-1 exactly
    dataset = Path(stages["ingest"]["path"])
    assert head_top1(probe_dir / "head", dataset, [Path(stages["dump"]["path"])], selection) == metrics["value"]

    # the training curve as a Prefect artifact (the one of this run names its PNG)
    only_curves = ArtifactFilter(key=ArtifactFilterKey(any_=["probe-training"]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=only_curves)
    mine = [a for a in artifacts if str(probe_dir / "training.png") in (a.data or "")]
    assert len(mine) == 1, [a.data for a in artifacts]
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \|( kept)?$", mine[0].data, flags=re.M)
    assert [int(e) for e, _ in rows] == [1, 2, 3, 4]
    assert [int(e) for e, kept in rows if kept] == [details["best_epoch"]]


# ---------------------------------------------------------------------------------------------
#                         2. Noise draws: one dump per draw, draw 0 shared
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draws_work(cli_attentive: tuple[Path, dict]) -> dict:
    """The fixed pair probed linearly, attentively on draw 0, then on draws 0 and 1 (in the CLI run's workdir)."""
    workdir = cli_attentive[0]
    linear = pipeline(workdir, "backbone.threads=1", *FIXED)
    one = pipeline(workdir, *ATTENTIVE, *FIXED)
    two = pipeline(workdir, *ATTENTIVE, *FIXED, "probe.noise_draws=2")
    return {"workdir": workdir, "linear": linear, "one": one, "two": two}


@pytest.mark.slow
def test_noise_draws_dump_the_pair_once_per_draw_and_draw_0_is_every_dumps_noise(draws_work: dict) -> None:
    linear, one, two = draws_work["linear"], draws_work["one"], draws_work["two"]
    assert [s["name"] for s in two["stages"]] == ["ingest", "backbone", "select", "dump", "dump", "probe"]
    draw0, draw1 = dumps(two)
    (only,) = dumps(one)
    # draw 0 is the attentive run's dump of one draw: reused, not dumped again; draw 1 is new
    assert draw0["key"] == only["key"] and draw0["cached"] and draw0["status"] == "Cached"
    assert not draw1["cached"] and draw1["key"] != draw0["key"]
    assert all(by_name(run)[name]["cached"] for run in (linear, one, two) for name in ("ingest", "backbone"))
    assert by_name(two)["select"]["cached"]
    m0, m1 = manifest(draw0), manifest(draw1)
    assert m0["inputs"]["config"]["draw"] == 0 and m1["inputs"]["config"]["draw"] == 1
    assert {k: v for k, v in m0["inputs"]["config"].items() if k != "draw"} == {
        k: v for k, v in m1["inputs"]["config"].items() if k != "draw"}
    assert m0["layout"] == m1["layout"] and m0["layout"]["spatial"]
    assert (m0["layout"]["timesteps"], m0["layout"]["layers"], m0["layout"]["sites"]) == ([100], [1], ["block"])

    probe = by_name(two)["probe"]
    assert not probe["cached"] and probe["key"] != by_name(one)["probe"]["key"]
    assert manifest(probe)["inputs"]["upstream"] == {"features": draw0["key"], "draw1": draw1["key"]}
    details = json.loads((Path(probe["path"]) / "metrics.json").read_text())["details"]
    assert details["draws"] == 2 and details["evaluation"] == "logits averaged over 2 draws"
    assert "2 noise draw(s)" in probe["summary"]
    # the head's reported top-1 is that of its logits averaged over both draws' token maps
    dataset = Path(by_name(two)["ingest"]["path"])
    assert head_top1(Path(probe["path"]) / "head", dataset, [Path(draw0["path"]), Path(draw1["path"])], PAIR) == \
        two["metrics"]["value"]

    # at t=100 another noise draw gives other features; draw 0 is the noise of the linear path's dump
    f0, f1 = open_features(Path(draw0["path"])), open_features(Path(draw1["path"]))
    assert np.array_equal(f0["sample"][:], f1["sample"][:])
    maps0, maps1 = f0["spatial"][:].astype(np.float32), f1["spatial"][:].astype(np.float32)
    assert maps0.shape == maps1.shape and np.abs(maps0 - maps1).mean() > 1e-2 * np.abs(maps0).mean()
    assert not np.allclose(f0["pooled"][:], f1["pooled"][:], atol=1e-3)
    (linear_dump,) = dumps(linear)
    lin = open_features(Path(linear_dump["path"]))
    assert "spatial" in f0 and "spatial" not in lin and manifest(linear_dump)["inputs"]["config"]["draw"] == 0
    assert np.array_equal(lin["sample"][:], f0["sample"][:])
    assert np.array_equal(lin["pooled"][:], f0["pooled"][:])  # bit for bit: the same noise, the same forward pass


@pytest.mark.slow
def test_an_attentive_rerun_is_all_cached_with_the_same_metrics(draws_work: dict) -> None:
    workdir, two = draws_work["workdir"], draws_work["two"]
    before = manifests(workdir)
    head = (Path(by_name(two)["probe"]["path"]) / "head" / "head.safetensors").read_bytes()
    again = pipeline(workdir, *ATTENTIVE, *FIXED, "probe.noise_draws=2")
    assert all(s["status"] == "Cached" and s["cached"] for s in again["stages"]), again
    assert [s["key"] for s in again["stages"]] == [s["key"] for s in two["stages"]]
    assert again["metrics"] == two["metrics"] and again["selection"] == two["selection"]
    assert manifests(workdir) == before  # nothing rewritten
    assert (Path(by_name(again)["probe"]["path"]) / "head" / "head.safetensors").read_bytes() == head


@pytest.mark.slow
def test_a_damaged_head_is_found_and_retrained_to_the_same_weights(draws_work: dict) -> None:
    workdir, two = draws_work["workdir"], draws_work["two"]
    probe = by_name(two)["probe"]
    weights = Path(probe["path"]) / "head" / "head.safetensors"
    before = weights.read_bytes()
    weights.write_bytes(before[: len(before) // 2])  # truncated after the stage finished
    rerun = by_name(pipeline(workdir, *ATTENTIVE, *FIXED, "probe.noise_draws=2"))
    assert all(rerun[name]["cached"] for name in ("ingest", "backbone", "select"))
    assert [s["cached"] for s in rerun.values() if s["name"] == "dump"] == [True]  # by_name keeps the last dump
    assert not rerun["probe"]["cached"] and manifest(rerun["probe"])["status"] == "complete"
    assert weights.read_bytes() == before  # retrained bit-identically
    assert Workdir(workdir).stage("probe", probe["key"]).damage(full=True) == []


@pytest.mark.slow
def test_the_exhaustive_flow_probes_its_oracle_pair_attentively(draws_work: dict) -> None:
    from aselect.flows.pipeline import aselect_exhaustive

    workdir = draws_work["workdir"]
    grid = ["dump.timesteps=[0, 100]", "dump.sites=[block]"]
    result = aselect_exhaustive(config="smoke", overrides=[*ATTENTIVE, *grid], workdir=str(workdir))
    names = [s["name"] for s in result["stages"]]
    assert names == ["ingest", "backbone", "dump", "score", "select", "dump", "probe"]
    stages = result["stages"]
    grid_dump, pair_dump, probe = stages[2], stages[5], stages[6]
    assert not manifest(grid_dump)["layout"]["spatial"] and manifest(pair_dump)["layout"]["spatial"]
    selection = result["selection"]
    assert selection["policy"] == "oracle"
    layout = manifest(pair_dump)["layout"]
    assert (layout["timesteps"], layout["layers"], layout["sites"]) == (
        [selection["timestep"]], [selection["layer"]], [selection["site"]])
    assert manifest(probe)["inputs"]["upstream"] == {"features": pair_dump["key"]}
    assert result["metrics"]["metric"] == "top1" and "attentive probe" in probe["summary"]
    # the oracle's pair is scored from the grid's pooled features: the same as the pair dump's (draw 0)
    grid_features = PairReader(grid_dump["path"], selection["timestep"], selection["layer"], selection["site"],
                               spatial=False).read_all()
    pair_features = PairReader(pair_dump["path"], selection["timestep"], selection["layer"], selection["site"],
                               spatial=False).read_all()
    assert np.array_equal(grid_features, pair_features)


# ---------------------------------------------------------------------------------------------
#                                 3. SIGKILL during training
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_attentive_training_resumes_to_the_same_head(
        prefect_api_url: str, draws_work: dict, tmp_path: Path) -> None:
    reference = draws_work["one"]
    workdir = tmp_path / "killed"
    for name in ("ingest", "backbone", "select", "dump"):  # a copy of the finished stages: only the probe runs
        stage = by_name(reference)[name]
        shutil.copytree(stage["path"], workdir / name / stage["key"], ignore=shutil.ignore_patterns(".*"))
    copied = manifests(workdir)
    proc = _cli(prefect_api_url, workdir, *ATTENTIVE, *FIXED, ASELECT_FAILPOINT="probe-epoch@2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    (stage,) = workdir.glob("probe/*")
    assert stage.name == by_name(reference)["probe"]["key"] and manifest(stage)["status"] == "partial"
    assert {p: t for p, t in manifests(workdir).items() if p.parent != stage} == copied  # the copies were reused
    # killed after epoch 2's checkpoint: both epochs are on disk, no head yet
    assert sorted(p.name for p in (stage / "checkpoints").glob("epoch-*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert not (stage / "head").exists() and not (stage / "metrics.json").exists()

    resumed = pipeline(workdir, *ATTENTIVE, *FIXED)
    stages, want = by_name(resumed), by_name(reference)
    assert [s["key"] for s in resumed["stages"]] == [s["key"] for s in reference["stages"]]
    assert all(stages[name]["cached"] for name in ("ingest", "backbone", "select", "dump"))  # in both runs
    assert not stages["probe"]["cached"] and stages["probe"]["status"] == "Completed"
    record = manifest(stages["probe"])
    assert record["attempts"] == 2 and record["status"] == "complete"
    got = json.loads((Path(stages["probe"]["path"]) / "metrics.json").read_text())
    expected = json.loads((Path(want["probe"]["path"]) / "metrics.json").read_text())
    assert got["details"]["resumed_from"] == 2 and expected["details"]["resumed_from"] == 0
    assert got["value"] == expected["value"] == reference["metrics"]["value"]
    for key in ("curve", "best_epoch", "val_score", "fit_size", "test_size"):
        assert got["details"][key] == expected["details"][key], key
    assert_same_head(stages["probe"], want["probe"])
    assert not (Path(stages["probe"]["path"]) / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
#                                     4. Config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["probe.noise_draws=2"], "probe: noise_draws 2: extra noise draws train the attentive probe; set kind: attentive"),
    (["probe.preset=paper"], "probe: preset 'paper' is the attentive probe's: set kind: attentive"),
    (["probe.kind=attentive", "probe.width=100", "probe.heads=8"], "probe: width 100 is not divisible by heads 8"),
    (["probe.width=100", "probe.heads=8"], "probe: width 100 is not divisible by heads 8"),
    (["probe.kind=attentive", "probe.noise_draws=0"], "probe.noise_draws: Input should be greater than or equal to 1"),
    (["probe.kind=attentive", "probe.preset=paper", "probe.heads=7"], "width 800 is not divisible by heads 7"),
    (["probe.online=true"], "probe: online: features computed in the training loop are the attentive probe's"),
], ids=["draws-linear", "paper-linear", "heads-attentive", "heads-linear", "draws-zero", "paper-heads",
        "online-linear"])
def test_attentive_probe_config_errors_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(AselectError) as info:
        load_config("smoke", overrides)
    assert "\n" not in str(info.value) and message in str(info.value), str(info.value)


def test_the_paper_preset_fills_only_the_keys_left_unset() -> None:
    probe = load_config("smoke", ["probe.kind=attentive", "probe.preset=paper", "probe.epochs=3"]).probe
    assert (probe.width, probe.heads, probe.batch_size, probe.val_fraction, probe.epochs) == (800, 8, 8, 0.1, 3)


# ---------------------------------------------------------------------------------------------
#                          Online features (`probe.online`): no dump, same head
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_online_features_train_the_same_head_as_stored_draws_when_k_covers_the_epochs(draws_work: dict) -> None:
    workdir = draws_work["workdir"]
    short = [*ATTENTIVE, *FIXED, "probe.epochs=2", "probe.noise_draws=2"]
    stored = pipeline(workdir, *short)  # draws 0 and 1 are the `two` run's dumps, reused
    online = pipeline(workdir, *short, "probe.online=true")
    assert [s["name"] for s in online["stages"]] == ["ingest", "backbone", "select", "probe"]
    probe, reference = by_name(online)["probe"], by_name(stored)["probe"]
    assert probe["key"] != reference["key"] and not probe["cached"]
    # epoch e trains on draw e - 1 in both; evaluation averages draws 0 and 1 in both
    assert online["metrics"]["value"] == stored["metrics"]["value"]
    details = json.loads((Path(probe["path"]) / "metrics.json").read_text())["details"]
    expected = json.loads((Path(reference["path"]) / "metrics.json").read_text())["details"]
    assert details["online"] and not expected["online"]
    assert [row[1:] for row in details["curve"]] == [row[1:] for row in expected["curve"]]
    heads = [load_file(Path(s["path"]) / "head" / "head.safetensors") for s in (probe, reference)]
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    # the forward passes are the probe's own cost; its features are named by the dump it did not run
    record = manifest(probe)
    assert record["accounting"]["images_timesteps"] > 2 * len(read_split(Path(by_name(online)["ingest"]["path"]))[1])
    assert record["online"]["features"] == dumps(draws_work["one"])[0]["key"]
    assert online["cost"]["forward_passes"] == record["accounting"]["images_timesteps"]
    again = pipeline(workdir, *short, "probe.online=true")
    assert all(s["cached"] for s in again["stages"]) and again["metrics"] == online["metrics"]
    # a finished online run applies to images like any other: the same top-1 on its own test images
    from aselect.pipelines.predict import load_run
    from aselect.storage.datasets import read_dataset

    run = load_run(workdir, run=probe["key"])
    assert "dump" not in run.stages and [n.draw for n in run.noise] == [0, 1]
    data = read_dataset(Path(by_name(online)["ingest"]["path"]))
    test_idx = data.test_idx
    predicted = run.predict(data.images[test_idx], indices=test_idx).classes
    assert float((predicted == data.labels[test_idx]).mean()) == pytest.approx(online["metrics"]["value"], abs=1e-9)


@pytest.mark.slow
def test_an_online_probe_sees_a_new_draw_every_epoch(draws_work: dict) -> None:
    workdir = draws_work["workdir"]
    one = pipeline(workdir, *ATTENTIVE, *FIXED, "probe.epochs=3", "probe.online=true")
    cycled = pipeline(workdir, *ATTENTIVE, *FIXED, "probe.epochs=3")  # draw 0 every epoch
    assert "3 fresh online draws" in by_name(one)["probe"]["summary"]
    losses = [json.loads((Path(by_name(r)["probe"]["path"]) / "metrics.json").read_text())["details"]["curve"]
              for r in (one, cycled)]
    assert losses[0][0] == losses[1][0]  # epoch 1: draw 0 in both
    assert losses[0][1][1] != losses[1][1][1]  # epoch 2: draw 1 online, draw 0 again from the single dump


# ---------------------------------------------------------------------------------------------
#                                     5. Segmentation
# ---------------------------------------------------------------------------------------------

SHAPES = ["ingest.num_images=60", "ingest.image_size=16", "backbone.variant=DiT-XS/2", "backbone.threads=1",
          "backbone.pretrain.steps=20", "backbone.pretrain.checkpoint_every=10", "backbone.pretrain.batch_size=16",
          "dump.images_per_chunk=64", "dask.workers=1", *FIXED]


@pytest.mark.slow
def test_attentive_segmentation_reuses_the_linear_probes_token_maps_and_saves_a_head(
        prefect_api_url: str, tmp_path: Path) -> None:
    from aselect.flows.pipeline import aselect_pipeline

    linear = aselect_pipeline(config="shapes", overrides=SHAPES, workdir=str(tmp_path))
    result = aselect_pipeline(config="shapes", overrides=[*SHAPES, "probe.kind=attentive", "probe.epochs=3"],
                              workdir=str(tmp_path))
    stages = by_name(result)
    assert [s["name"] for s in result["stages"]] == ["ingest", "backbone", "select", "dump", "probe"]
    # segmentation dumps token maps for either probe: the linear run's dump is draw 0's, reused
    assert stages["dump"]["cached"] and stages["dump"]["key"] == by_name(linear)["dump"]["key"]
    assert not stages["probe"]["cached"] and stages["probe"]["key"] != by_name(linear)["probe"]["key"]
    metrics = json.loads((Path(stages["probe"]["path"]) / "metrics.json").read_text())
    assert metrics["metric"] == "miou" and 0.0 <= metrics["value"] <= 1.0 and result["metrics"]["metric"] == "miou"
    assert metrics["details"]["tokens"] == 64 and metrics["details"]["num_classes"] == 5
    assert 0.0 <= metrics["details"]["pixel_accuracy"] <= 1.0
    head_dir = Path(stages["probe"]["path"]) / "head"
    head, config = load_head(head_dir)
    assert config["task"] == "segmentation" and not config["cls_token"] and config["selection"] == PAIR
    assert head.cls is None and config["classes"] == 5
    assert not (Path(stages["probe"]["path"]) / "checkpoints").exists()
