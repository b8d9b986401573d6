"""The malformed-input catalogue: every case exits non-zero with one line naming the item, and touches no stage.

Each case runs `aselect run smoke ...` (the CLI's `main`, in-process against the session's Prefect server)
on a workdir that already holds a complete smoke run, then checks that every file of that run is still
there, byte for byte.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiTTransformer2DModel, UNet2DModel
from PIL import Image

from aselect.flows.cli import main
from aselect.flows.pipeline import aselect_pipeline


@dataclass(frozen=True)
class Case:
    """Arguments after `aselect run`; `build(tmp)` makes the files they point at and returns format fields."""

    name: str
    args: tuple[str, ...]
    expect: str  # the error line must contain this (after formatting with build's fields)
    build: Callable[[Path], dict[str, str]] = lambda tmp: {}
    config: str = "smoke"


# ---------------------------------------------------------------------------------------------
#                                        Input builders
# ---------------------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L", value: int | tuple = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format="PNG")
    return path


def _folder(tmp: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 6) -> Path:
    root = tmp / "images"
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"{i}.png", value=20 * i + (0 if c == "cat" else 7))
    return root


def corrupt_png(tmp: Path) -> dict[str, str]:
    root = _folder(tmp)
    bad = root / "cat" / "bad.png"
    bad.write_bytes(_png(tmp / "x.png", (16, 16)).read_bytes()[:40])
    return {"root": str(root), "bad": str(bad)}


def zero_byte(tmp: Path) -> dict[str, str]:
    root = _folder(tmp)
    (root / "dog" / "empty.png").write_bytes(b"")
    return {"root": str(root), "bad": str(root / "dog" / "empty.png")}


def not_an_image(tmp: Path) -> dict[str, str]:
    root = _folder(tmp)
    (root / "dog" / "notes.png").write_text("these are notes, not pixels\n")
    return {"root": str(root), "bad": str(root / "dog" / "notes.png")}


def empty_class(tmp: Path) -> dict[str, str]:
    root = _folder(tmp)
    (root / "bird").mkdir()
    return {"root": str(root), "bad": str(root / "bird")}


def single_class(tmp: Path) -> dict[str, str]:
    return {"root": str(_folder(tmp, classes=("cat",)))}


def no_class_folders(tmp: Path) -> dict[str, str]:
    root = tmp / "flat"
    for i in range(4):
        _png(root / f"{i}.png")
    return {"root": str(root)}


def mixed_sizes_and_modes(tmp: Path) -> dict[str, str]:
    """8-bit images of any size and mode are converted (tests/test_ingest.py); a 16-bit one, which PIL
    would clip, is refused and named."""
    root = _folder(tmp)
    _png(root / "cat" / "big.png", (40, 24), "RGB", (200, 10, 10))
    _png(root / "dog" / "pal.png", (5, 9), "P", 3)
    wide = root / "dog" / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(wide)
    return {"root": str(root), "bad": str(wide)}


def not_a_dit(tmp: Path) -> dict[str, str]:
    model = tmp / "unet"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(model)
    return {"model": str(model)}


def truncated_weights(tmp: Path) -> dict[str, str]:
    model = tmp / "dit"
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=11).save_pretrained(model)
    weights = model / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {"model": str(model)}


def bad_yaml(tmp: Path) -> dict[str, str]:
    path = tmp / "broken.yaml"
    path.write_text("name: broken\ningest:\n  source: [digits\n")
    return {"config": str(path)}


def workdir_is_a_file(tmp: Path) -> dict[str, str]:
    path = tmp / "work.txt"
    path.write_text("not a directory\n")
    return {"workdir": str(path)}


def binary_config(tmp: Path) -> dict[str, str]:
    path = tmp / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    return {"config": str(path)}


def nan_weights(tmp: Path) -> dict[str, str]:
    """A loadable DiT whose weights are NaN: features must be refused where they are produced."""
    model = tmp / "nan-dit"
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    for param in dit.parameters():
        param.data.fill_(float("nan"))
    dit.save_pretrained(model)
    return {"model": str(model)}


FOLDER = ("--set", "ingest.source=imagefolder", "--set", "ingest.root={root}")
LOAD = ("--set", "backbone.kind=load", "--set", "backbone.path={model}")

CASES = [
    # config
    Case("unknown key", ("--set", "ingest.sourse=digits"), "ingest.sourse: unknown key"),
    Case("wrong type", ("--set", "ingest.image_size=big"), "ingest.image_size: Input should be a valid integer"),
    Case("negative timestep", ("--set", "dump.timesteps=[-5,10]"), "dump: timesteps must be >= 0 (got [-5, 10])"),
    Case("timestep beyond the scheduler", ("--set", "dump.timesteps=[0,1000]"),
         "dump.timesteps [1000] must be < backbone.num_train_timesteps (1000)"),
    Case("layer out of range", ("--set", "dump.layers=[0,5]"), "dump.layers [0, 5]: DiT-XS/2 has 2 layers (0..1)"),
    Case("empty timestep list", ("--set", "dump.timesteps=[]"), "dump.timesteps: List should have at least 1 item"),
    Case("unknown source", ("--set", "ingest.source=cifar"), "ingest.source: Input should be 'digits'"),
    Case("unknown policy", ("--set", "select.policy=greedy"), "select.policy: Input should be 'aselect'"),
    Case("HFR site not calibrated", ("--set", "select.hfr_site=mlp"),
         "select.hfr_site 'mlp' must be one of calibrate.sites ['attn']"),
    Case("calibration too small", ("--set", "calibrate.images=2"), "calibrate.images: Input should be greater"),
    Case("missing config file", (), "{config}: config file not found",
         lambda tmp: {"config": str(tmp / "nope.yaml")}, config="{config}"),
    Case("invalid YAML", (), "{config}: line 4 invalid YAML", bad_yaml, config="{config}"),
    # data
    Case("corrupt PNG", FOLDER, "{bad}: cannot read image (", corrupt_png),
    Case("zero-byte file", FOLDER, "{bad}: zero-byte image file", zero_byte),
    Case("non-image file", FOLDER, "{bad}: cannot read image (unrecognised image format)", not_an_image),
    Case("empty class folder", FOLDER, "{bad}: empty class folder", empty_class),
    Case("a single class", FOLDER, "{root}: only 1 class (cat); need at least 2", single_class),
    Case("no class folders", FOLDER, "{root}: no class folders", no_class_folders),
    Case("mixed sizes and modes, one 16-bit", FOLDER, "{bad}: cannot read image (I;16 pixels", mixed_sizes_and_modes),
    Case("missing image root", FOLDER, "{root}: imagefolder root does not exist",
         lambda tmp: {"root": str(tmp / "absent")}),
    # model
    Case("missing model directory", LOAD, "{model}: backbone directory does not exist",
         lambda tmp: {"model": str(tmp / "no-model")}),
    Case("config.json is not a DiT", LOAD, "{model}/config.json: _class_name is 'UNet2DModel', expected "
         "DiTTransformer2DModel", not_a_dit),
    Case("truncated safetensors", LOAD, "{model}: cannot load weights (", truncated_weights),
    # storage
    Case("workdir is a file", ("--workdir", "{workdir}"), "{workdir}: workdir path is a file", workdir_is_a_file),
    # never silently wrong (issue 15): undecodable input, impossible settings, non-finite numbers, unreachable
    Case("config file is not text", (), "{config}: not a text file", binary_config, config="{config}"),
    Case("--set value is not YAML", ("--set", "dump.timesteps=[0, 1"),
         "--set 'dump.timesteps=[0, 1': the value is not valid YAML"),
    Case("image size beyond the pretrained grid", ("--set", "ingest.image_size=512"),
         "ingest.image_size 512 makes 65536 tokens per image with DiT-XS/2 (patch 2)"),
    Case("feature layer out of range", ("--set", "select.feature_layer=7"),
         "select.feature_layer 7: DiT-XS/2 has 2 layers (0..1)"),
    Case("HFR cutoff above the token grid", ("--set", "score.hfr_cutoff=1.45"),
         "score.hfr_cutoff 1.45: no frequency of the 4x4 token grid is above it (the highest is 1.414)"),
    Case("HFR cutoff below the token grid", ("--set", "score.hfr_cutoff=0.3"),
         "score.hfr_cutoff 0.3: every non-DC frequency of the 4x4 token grid is above it (the lowest is 0.500)"),
    Case("NaN weights", LOAD, "{model}: non-finite features (hfr) at t=0, layer 0", nan_weights),
    Case("unreachable Dask scheduler", ("--set", "select.policy=fewshot", "--set", "dask.address=tcp://127.0.0.1:9"),
         "dask.address tcp://127.0.0.1:9: no Dask scheduler answered within 10 s"),
]


# ---------------------------------------------------------------------------------------------
#                                            Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_workdir(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir holding a complete smoke run: every case runs on top of it."""
    workdir = tmp_path_factory.mktemp("finished")
    aselect_pipeline(config="smoke", workdir=str(workdir))
    return workdir


def snapshot(workdir: Path) -> dict[str, str]:
    """sha256 of every file the finished run wrote (Prefect's cache records and lock files aside)."""
    return {p.relative_to(workdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in workdir.rglob("*") if p.is_file() and p.relative_to(workdir).parts[0] not in
            (".prefect-results", ".locks")}


def run_case(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def test_catalogue_has_twenty_cases() -> None:
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input(case: Case, finished_workdir: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    fields = case.build(tmp_path)
    before = snapshot(finished_workdir)
    args = [a.format(**fields) for a in case.args]
    argv = ["run", case.config.format(**fields), *args]
    if "--workdir" not in args:
        argv += ["--workdir", str(finished_workdir)]
    code, line = run_case(argv, capsys)
    assert code != 0
    assert line.startswith("aselect: error: ") and case.expect.format(**fields) in line, line
    after = snapshot(finished_workdir)
    assert {k: after.get(k) for k in before} == before, "a failed run changed finished stage data"


def test_read_only_workdir(finished_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only bind mount of a finished workdir (chmod does not stop root): one line, nothing changed."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(finished_workdir), str(readonly)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({mounted.stderr.decode().strip()}); needs root and CAP_SYS_ADMIN")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(readonly)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({remount.stderr.decode().strip()})")
        before = snapshot(finished_workdir)
        code, line = run_case(["run", "smoke", "--workdir", str(readonly)], capsys)
        assert code != 0
        assert line == f"aselect: error: {readonly}: workdir is not writable (read-only)", line
        assert snapshot(finished_workdir) == before
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)
