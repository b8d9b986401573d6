"""Config loading: sections, overrides and one-line errors that name the file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from aselect.pipelines.config import RunConfig, bundled_configs, load_config, resolve_config_path
from aselect.storage.errors import AselectError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(bundled_configs()))
def test_bundled_configs_validate(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name


def test_digits_is_the_default() -> None:
    assert load_config().ingest.source == "digits"


def test_set_overrides_nested_values_with_yaml_types() -> None:
    cfg = load_config("smoke", ["backbone.pretrain.steps=7", "ingest.skip_bad=true", "workdir=/tmp/x"])
    assert cfg.backbone.pretrain.steps == 7
    assert cfg.ingest.skip_bad is True
    assert cfg.workdir == Path("/tmp/x")


@pytest.mark.parametrize(("text", "pattern"), [
    ("ingest:\n  sourse: digits\n", r"run\.yaml: ingest\.sourse: unknown key$"),
    ("backbone:\n  pretrain:\n    steps: many\n", r"run\.yaml: backbone\.pretrain\.steps: .*integer.*'many'"),
    ("backbone:\n  pretrain:\n    steps: -5\n", r"backbone\.pretrain\.steps: .*greater than or equal to 1.*-5"),
    ("ingest:\n  source: cifar\n", r"ingest\.source: .*'digits'.*'cifar'"),
    ("ingest:\n  source: imagefolder\n", r"ingest: root is required when source is 'imagefolder'"),
    ("backbone:\n  variant: DiT-Q/9\n", r"backbone: unknown variant 'DiT-Q/9'"),
    ("backbone:\n  kind: load\n", r"backbone: path is required when kind is 'load'"),
    ("select:\n  hfr_site: mlp\n", r"select\.hfr_site 'mlp' must be one of calibrate\.sites \['attn'\]"),
    ("dump:\n  timesteps: []\n", r"dump\.timesteps: List should have at least 1 item"),
    ("dump:\n  timesteps: [0, -5]\n", r"dump: timesteps must be >= 0"),
    ("dump:\n  timesteps: [0, 1000]\n", r"dump\.timesteps \[1000\] must be < backbone\.num_train_timesteps"),
    ("dump:\n  layers: [9]\n", r"dump\.layers \[9\]: DiT-T/2 has 6 layers"),
    ("dump:\n  blocks: [1]\n", r"run\.yaml: dump\.blocks: renamed to dump\.layers$"),
    ("- a\n- b\n", r"run\.yaml: expected a mapping of sections, got list"),
    ("ingest: [\n", r"run\.yaml: line \d+ invalid YAML"),
])
def test_bad_config_gives_one_line_naming_file_and_key(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(AselectError, match=pattern) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert str(tmp_path / "run.yaml") in str(info.value)


@pytest.mark.parametrize(("override", "message"), [
    ("ingest.image_size=big", "ingest.image_size: Input should be a valid integer"),
    ("dump.timesteps=[-5,10]", "dump: timesteps must be >= 0 (got [-5, 10])"),
    ("dump.layers=[0,5]", "dump.layers [0, 5]: DiT-XS/2 has 2 layers (0..1)"),
    ("ingest.source=cifar", "ingest.source: Input should be 'digits'"),
    ("select.policy=greedy", "select.policy: Input should be 'aselect'"),
    ("select.hfr_site=mlp", "select.hfr_site 'mlp' must be one of calibrate.sites ['attn']"),
    ("calibrate.images=2", "calibrate.images: Input should be greater"),
    ("dump.timesteps=[]", "dump.timesteps: List should have at least 1 item"),
])
def test_bad_override_of_a_bundled_config_is_one_line(override: str, message: str) -> None:
    """What tests/test_malformed.py once ran end to end: refused while the config is read, before any stage."""
    with pytest.raises(AselectError) as info:
        load_config("smoke", [override])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(str(resolve_config_path("smoke")))


def test_bad_override_names_the_override() -> None:
    with pytest.raises(AselectError, match=r"--set backbone\.pretrain\.stepz=3\): backbone\.pretrain\.stepz: unknown"):
        load_config("smoke", ["backbone.pretrain.stepz=3"])
    with pytest.raises(AselectError, match=r"--set 'nonsense': expected section\.key=value"):
        load_config("smoke", ["nonsense"])


def test_missing_config_names_it() -> None:
    with pytest.raises(AselectError, match=r"nope\.yaml: config file not found"):
        load_config("nope.yaml")
    with pytest.raises(AselectError, match=r"nope: no such config file or bundled config \(bundled: .*digits"):
        load_config("nope")


def test_extends_merges_sections_over_the_base(tmp_path: Path) -> None:
    digits, noisy = load_config("digits"), load_config("digits-noisy")
    # the testbed differs from digits only by its name and the sensor noise, so it shares digits' stages
    assert noisy.name == "digits-noisy" and noisy.dump.sensor_noise == 1.0 and digits.dump.sensor_noise == 0.0
    assert noisy.model_dump(exclude={"name", "dump"}) == digits.model_dump(exclude={"name", "dump"})
    assert noisy.dump.model_dump(exclude={"sensor_noise"}) == digits.dump.model_dump(exclude={"sensor_noise"})
    # a local base by path, nested keys merged, --set on top of both
    (tmp_path / "base.yaml").write_text("ingest:\n  source: digits\n  image_size: 8\nprobe:\n  seed: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ningest:\n  image_size: 12\n")
    child = load_config(tmp_path / "child.yaml", ["probe.seed=4"])
    assert (child.name, child.ingest.source, child.ingest.image_size, child.probe.seed) == ("child", "digits", 12, 4)


@pytest.mark.parametrize(("text", "pattern"), [
    ("extends: nope\n", r"nope: no such config file or bundled config"),
    ("extends: [digits]\n", r"loop\.yaml: extends: expected a config name or path, got \['digits'\]"),
    ("extends: loop.yaml\n", r"loop\.yaml: extends: 'loop\.yaml' extends itself \(a cycle\)"),
])
def test_bad_extends_is_one_line(tmp_path: Path, text: str, pattern: str) -> None:
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(AselectError, match=pattern):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("ingest.seed=-1", "ingest.seed: Input should be greater than or equal to 0 (got -1)"),
    ("dump.seed=100000000000000000000000", "dump.seed: Input should be less than or equal to 4294967295"),
    ("select.bootstrap_seed=-3", "select.bootstrap_seed: Input should be greater than or equal to 0 (got -3)"),
    ("probe.seed=4294967296", "probe.seed: Input should be less than or equal to 4294967295"),
    ("backbone.pretrain.seed=-1", "backbone.pretrain.seed: Input should be greater than or equal to 0"),
    ("probe.cs=[.nan]", "probe.cs.0: Input should be a finite number (got nan)"),
    ("probe.cs=[1, -1]", "probe.cs.1: Input should be greater than 0 (got -1)"),
    ("score.hfr_cutoff=.inf", "score.hfr_cutoff: Input should be a finite number (got inf)"),
    ("dump.sensor_noise=.nan", "dump.sensor_noise: Input should be a finite number (got nan)"),
    ("bench.scaling_fractions=[0.5, -.inf]", "bench.scaling_fractions.1: Input should be a finite number"),
    ("dask.resources={GPU: .nan}", "dask.resources.GPU: Input should be a finite number (got nan)"),
    ("dump.images_per_chunk=20000000", "dump.images_per_chunk 20000000: a chunk of DiT-XS/2's pooled features (32 "
     "float32 per image) would be 2.4 GiB, past the codec's 2 GiB buffer; at most 16777215"),
    ("dump.images_per_chunk=900000000", "dump.images_per_chunk: Input should be less than or equal to 536870907"),
])
def test_out_of_range_seeds_non_finite_numbers_and_huge_chunks_are_refused(override: str, message: str) -> None:
    with pytest.raises(AselectError) as info:
        load_config("smoke", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_largest_seed_and_chunk_are_accepted() -> None:
    cfg = load_config("smoke", ["ingest.seed=4294967295", "dump.images_per_chunk=16777215"])
    assert (cfg.ingest.seed, cfg.dump.images_per_chunk) == (2**32 - 1, 16777215)


def alias_bomb(levels: int) -> str:
    """A YAML "billion laughs": `levels` lists of 10 aliases of the list before, 10**(levels + 1) values in all."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "laughs:\n" + "".join(f"  {line}\n" for line in lines) + f"name: *a{levels}\n"


@pytest.mark.parametrize(("text", "pattern"), [
    (alias_bomb(8), r"run\.yaml: the YAML expands past 100000 values \(nested aliases\)$"),
    ("name: &a [*a]\n", r"run\.yaml: the YAML expands past 100000 values"),  # a list holding itself
    ("x: &x 1\n" + "".join(f"y{i}: *x\n" for i in range(101)), r"run\.yaml: more than 100 YAML aliases"),
    ("name: " + "[" * 600 + "]" * 600 + "\n", r"run\.yaml: the YAML is nested too deeply$"),
])
def test_yaml_bombs_are_refused_in_one_line(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(AselectError, match=pattern) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_a_yaml_bomb_in_an_override_is_refused() -> None:
    with pytest.raises(AselectError, match=r"^--set 'name=&a \[\*a\]': the YAML expands past 100000 values"):
        load_config("smoke", ["name=&a [*a]"])


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    path = write(tmp_path, "extends: smoke\ndump:\n  timesteps: &grid [0, 100]\nbench:\n  fixed_timestep: 100\n"
                           "calibrate:\n  timesteps: *grid\n")
    assert load_config(path).calibrate.timesteps == [0, 100]


def test_an_extends_chain_is_limited_and_named(tmp_path: Path) -> None:
    for i in range(1500):
        (tmp_path / f"c{i}.yaml").write_text(f"extends: c{i + 1}.yaml\n" if i < 1499 else "extends: smoke\n")
    with pytest.raises(AselectError) as info:
        load_config(tmp_path / "c0.yaml")
    assert str(info.value) == (f"{tmp_path / 'c0.yaml'}: extends: a chain of more than 32 files "
                               f"(c0.yaml -> c1.yaml -> c2.yaml -> ... -> c31.yaml -> c32.yaml)")
    (tmp_path / "c30.yaml").write_text("extends: smoke\n")  # 32 files, the bundled base the last: allowed
    assert load_config(tmp_path / "c0.yaml").name == "c0"
