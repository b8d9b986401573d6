"""The malformed-input catalogue end to end: every case exits non-zero with one line naming the item, and touches
no stage.

Each case runs `aselect run smoke ...` (the CLI's `main`, in-process against the session's Prefect server)
on a workdir that already holds a complete smoke run, then checks that every file of that run is still
there, byte for byte. A representative few per kind (config, data, model, storage, numbers, cluster) run here;
the other malformed inputs are unit tests beside the code that refuses them (tests/test_config.py,
tests/test_ingest.py, tests/test_backbone.py, tests/test_streamed.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def single_class(tmp: Path) -> dict[str, str]:
    return {"root": str(_folder(tmp, classes=("cat",)))}


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


def workdir_is_a_file(tmp: Path) -> dict[str, str]:
    path = tmp / "work.txt"
    path.write_text("not a directory\n")
    return {"workdir": str(path)}


def foreign_directory(tmp: Path) -> dict[str, str]:
    """Another program's directory (a home directory, say): files, no workdir marker, no stage directories."""
    home = tmp / "home"
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("export PS1='$ '\n")
    return {"workdir": str(home)}


def symlink_loop(tmp: Path) -> dict[str, str]:
    loop = tmp / "loop"
    loop.symlink_to(loop)
    return {"workdir": str(loop)}


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


def loadable_dit(tmp: Path) -> dict[str, str]:
    """A random DiT that loads (a bare transformer directory: the default 1000-step DDPM schedule)."""
    model = tmp / "dit"
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(model)
    return {"model": str(model)}


def alias_bomb_config(tmp: Path) -> dict[str, str]:
    """A config whose YAML aliases expand to 10**9 values ("billion laughs")."""
    path = tmp / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path.write_text("extends: smoke\nlaughs:\n" + "".join(f"  {line}\n" for line in lines) + "name: *a8\n")
    return {"config": str(path)}


FOLDER = ("--set", "ingest.source=imagefolder", "--set", "ingest.root={root}")
LOAD = ("--set", "backbone.kind=load", "--set", "backbone.path={model}")

CASES = [
    # config
    Case("unknown key", ("--set", "ingest.sourse=digits"), "ingest.sourse: unknown key"),
    Case("missing config file", (), "{config}: config file not found",
         lambda tmp: {"config": str(tmp / "nope.yaml")}, config="{config}"),
    Case("YAML alias bomb", (), "{config}: the YAML expands past 100000 values (nested aliases)", alias_bomb_config,
         config="{config}"),
    Case("seed beyond numpy's range", ("--set", "dump.seed=100000000000000000000000"),
         "dump.seed: Input should be less than or equal to 4294967295"),
    Case("NaN in the probe's C grid", ("--set", "probe.cs=[.nan]"), "probe.cs.0: Input should be a finite number"),
    # data
    Case("corrupt PNG", FOLDER, "{bad}: cannot read image (", corrupt_png),
    Case("a single class", FOLDER, "{root}: only 1 class (cat); need at least 2", single_class),
    # model
    Case("config.json is not a DiT", LOAD, "{model}/config.json: _class_name is 'UNet2DModel', expected "
         "DiTTransformer2DModel", not_a_dit),
    Case("truncated safetensors", LOAD, "{model}: cannot load weights (", truncated_weights),
    # storage
    Case("workdir is a file", ("--workdir", "{workdir}"), "{workdir}: workdir path is a file", workdir_is_a_file),
    Case("workdir holds another program's files", ("--workdir", "{workdir}"),
         "{workdir}: not an aselect workdir (it holds other files, no .aselect-workdir", foreign_directory),
    Case("workdir path is a symlink loop", ("--workdir", "{workdir}"), "{workdir}: workdir path is a symlink loop",
         symlink_loop),
    # never silently wrong: undecodable input, impossible settings, non-finite numbers, unreachable
    Case("config file is not text", (), "{config}: not a text file", binary_config, config="{config}"),
    Case("--set value is not YAML", ("--set", "dump.timesteps=[0, 1"),
         "--set 'dump.timesteps=[0, 1': the value is not valid YAML"),
    Case("image size beyond the pretrained grid", ("--set", "ingest.image_size=512"),
         "ingest.image_size 512 makes 65536 tokens per image with DiT-XS/2 (patch 2)"),
    Case("feature layer out of range", ("--set", "select.feature_layer=7"),
         "select.feature_layer 7: DiT-XS/2 has 2 layers (0..1)"),
    Case("HFR cutoff above the token grid", ("--set", "score.hfr_cutoff=1.45"),
         "score.hfr_cutoff 1.45: no frequency of the 4x4 token grid is above it (the highest is 1.414)"),
    Case("NaN weights", LOAD, "{model}: non-finite features (hfr) at t=0, layer 0", nan_weights),
    Case("calibration timestep past a loaded DiT's schedule", (*LOAD, "--set", "calibrate.timesteps=[0, 1500]"),
         "calibrate.timesteps (dump.timesteps when unset) [1500] must be < the scheduler's num_train_timesteps (1000)",
         loadable_dit),
    Case("unreachable Dask scheduler", ("--set", "select.policy=fewshot", "--set", "dask.address=tcp://127.0.0.1:9",
                                        "--set", "dask.connect_seconds=1.5"),
         "dask.address tcp://127.0.0.1:9: no Dask scheduler answered within 1.5 s"),
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
    """sha256 of every file the finished run wrote (lock files aside)."""
    return {p.relative_to(workdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in workdir.rglob("*") if p.is_file() and p.relative_to(workdir).parts[0] != ".locks"}


def run_case(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def test_catalogue_covers_every_kind_of_input() -> None:
    assert len(CASES) >= 12 and len({c.name for c in CASES}) == len(CASES)


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


def test_a_manifest_field_of_the_wrong_type_is_one_line_from_run(finished_workdir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "copy"
    shutil.copytree(finished_workdir, workdir, ignore=shutil.ignore_patterns(".locks"))
    expected = set()  # other cases may have left ingest stages of their own: every finished one gets the wrong type
    for manifest_path in (workdir / "ingest").glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("files"):  # a stage a refused case began: no files recorded
            continue
        name, (size, _) = next(iter(manifest["files"].items()))
        manifest_path.write_text(json.dumps({**manifest, "files": {**manifest["files"], name: [size, 7]}}))
        expected.add(f"aselect: error: {manifest_path}: field 'files' entry '{name}' has sha256 7, not 64 hex digits; "
                     f"remove the stage directory {manifest_path.parent} to compute it again")
    before = snapshot(workdir)
    code, line = run_case(["run", "smoke", "--workdir", str(workdir)], capsys)
    assert code == 2
    assert expected and line in expected, line
    assert snapshot(workdir) == before
