"""The documentation: links resolve, README stays short, configuration.md matches the config models, the README's
results summary matches bench/results.json, and no page carries work history. Fast: nothing runs."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from aselect.pipelines.config import RunConfig, Section

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
PAGES = sorted([README, ROOT / "CHANGELOG.md", *DOCS.glob("*.md")])
# Work history that has no place in user documentation: sessions, issue numbers, commit hashes (hex words with
# letters and digits), "lent" machines, "this machine" instead of naming it, and a design file users do not have.
HISTORY = re.compile(r"session [0-9]|issue [0-9]+|\blent\b|this machine|DESIGN\.md"
                     r"|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
#                                            Links
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (where brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links of `page` whose file is missing or outside the repository, or whose anchor is no heading."""
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    return problems


def test_the_pages_exist() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"method.md", "configuration.md", "results.md", "operations.md", "reliability.md",
            "development.md"} <= names
    assert (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page, page.read_text()) == []


def test_the_link_check_finds_broken_links() -> None:
    text = ("[ok](docs/method.md#hfr) [gone](docs/nothing.md) [anchor](docs/method.md#no-such-heading) "
            "[out](../../etc/passwd) [web](https://example.org/x) `[code](nowhere.md)`\n")
    assert broken_links(README, text) == [
        "docs/nothing.md: no such file",
        "docs/method.md#no-such-heading: no heading #no-such-heading in docs/method.md",
        "../../etc/passwd: outside the repository",
    ]


def test_readme_is_short_and_links_into_docs() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for page in ("method", "configuration", "results", "operations", "reliability", "development"):
        assert f"](docs/{page}.md" in text
    assert "make run" in text and "make test" in text and "make test-fast" in text


# ---------------------------------------------------------------------------------------------
#                               configuration.md against the models
# ---------------------------------------------------------------------------------------------


def section_type(annotation: Any) -> type[Section] | None:
    """The config section a field holds (also through `X | None`), or None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def literal_choices(annotation: Any) -> list[Any]:
    """Every Literal value anywhere in a field's type (`list[Literal[...]] | None` included)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in literal_choices(arg)]


def config_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every key of the config models, dotted (`backbone.pretrain.steps`) -> its pydantic FieldInfo."""
    out = {}
    for name, info in model.model_fields.items():
        out[prefix + name] = info
        sub = section_type(info.annotation)
        if sub is not None:
            out |= config_fields(sub, f"{prefix}{name}.")
    return out


def flow(value: Any) -> str:
    """A default as this page writes it: YAML flow style (`null`, `true`, `[a, b]`, `{}`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def documented_rows(text: str) -> dict[str, list[str]]:
    """Rows of the key tables (those whose header is `| key | default | meaning |`): key -> the other cells."""
    rows, in_keys = {}, False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_keys = False
        elif re.match(r"^\|\s*key\s*\|", line):
            in_keys = True
        elif in_keys and (m := re.match(r"^\|\s*`([^`]*)`\s*\|(.*)\|\s*$", line)):
            rows[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
        elif in_keys and not line.startswith("| ---"):
            rows[line] = []  # a row of a key table that names no key: reported as no such key
    return rows


def configuration_problems(text: str) -> list[str]:
    """What configuration.md (`text`) gets wrong about the config models: missing, unknown or wrongly
    defaulted keys, undocumented choices, sections without a heading."""
    fields = config_fields()
    rows = documented_rows(text)
    top_sections = {k for k, info in fields.items() if "." not in k and section_type(info.annotation)}
    headings = {m.group(1) for m in re.finditer(r"^#+\s+`([a-z_.]+)`\s*$", text, re.MULTILINE)}
    problems = []
    for key, info in fields.items():
        sub = section_type(info.annotation)
        if sub is not None and (key in top_sections or info.default is not None):
            if key not in headings:
                problems.append(f"{key}: no heading `{key}`")
            if key in top_sections:
                continue
        if key not in rows:
            problems.append(f"{key}: not documented")
            continue
        if sub is None:
            default = "required" if info.is_required() else info.get_default(call_default_factory=True)
            written = rows[key][0].strip("`") if rows[key] else ""
            if default != "required" and written != flow(default):
                problems.append(f"{key}: default written {written!r}, the model's is {flow(default)!r}")
        row = " | ".join(rows[key])
        for choice in literal_choices(info.annotation):
            if f"`{choice}`" not in row:
                problems.append(f"{key}: choice `{choice}` not documented")
    problems += [f"{key}: no such key" for key in rows if key not in fields]
    return problems


def test_configuration_documents_every_key_of_the_models_and_no_other() -> None:
    assert configuration_problems(CONFIGURATION.read_text()) == []


def test_the_configuration_check_finds_drift() -> None:
    text = CONFIGURATION.read_text()
    edits = {"| `dump.seed` | `0` |": "| `dump.seeds` | `0` |",
             "| `probe.seed` | `0` |": "| `probe.seed` | `1` |",
             "`shapes`, `textures` or `imagefolder` |": "`shapes` or `imagefolder` |",
             "### `backbone.pretrain`": "### pretraining"}
    drifted = text
    for old, new in edits.items():
        assert text.count(old) == 1, old
        drifted = drifted.replace(old, new)
    assert set(configuration_problems(drifted)) == {
        "dump.seed: not documented", "dump.seeds: no such key",
        "probe.seed: default written '1', the model's is '0'",
        "ingest.source: choice `textures` not documented",
        "backbone.pretrain: no heading `backbone.pretrain`"}


# ---------------------------------------------------------------------------------------------
#                                   README's results summary
# ---------------------------------------------------------------------------------------------


def test_readme_results_summary_matches_results_json() -> None:
    report = json.loads((ROOT / "bench" / "results.json").read_text())
    text = README.read_text()
    m = report["machine"]
    assert f"{m['cores']} CPU cores, {m['device']}, {report['generated'][:10]}" in text
    for c in report["configs"]:
        rows = {r["selector"]: r for r in c["selectors"]}
        default, oracle = rows["aselect"], rows["oracle"]
        expected = (f"| {c['config']} | {c['metric']} | {oracle['value']:.4f} | {default['value']:.4f} | "
                    f"{c['baselines']['pixels']['value']:.4f} | {default['regret_points']:.2f} | "
                    f"{default['cost_ratio']['forward_passes']:.2f}x |")
        assert expected in text


# ---------------------------------------------------------------------------------------------
#                                        No work history
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_work_history(page: Path) -> None:
    found = [f"{n}: {line.strip()}" for n, line in enumerate(page.read_text().splitlines(), 1)
             if HISTORY.search(line)]
    assert found == []


def test_the_history_check_finds_history() -> None:
    for line in ("measured in session 6's run", "as issue 12 asked", "no GPU was lent", "a cold run at 5a85e8e",
                 "On this machine it took", "see DESIGN.md", "measured at 6e1fbfa"):
        assert HISTORY.search(line), line
    assert not HISTORY.search("On 2 CPU cores, no GPU, 2026-11-27, it took 117.0 minutes")


# ---------------------------------------------------------------------------------------------
#                                 The generated results page
# ---------------------------------------------------------------------------------------------


def test_results_page_is_written_whole_or_between_its_markers(tmp_path: Path) -> None:
    from aselect.pipelines.benchmark import (
        README_END,
        README_START,
        measured_groups,
        readme_section,
        results_json_copy,
        write_results_page,
    )

    report = json.loads((ROOT / "bench" / "results.json").read_text())
    page = tmp_path / "docs" / "results.md"
    write_results_page(page, report)  # no page yet: the whole page
    whole = page.read_text()
    assert whole.startswith("# Benchmark results\n") and readme_section(report) in whole
    for stamp, names in measured_groups(report):  # the machine and date of every run that measured a config
        m = stamp["machine"]
        assert f"{', '.join(names)} on " * (len(measured_groups(report)) > 1) + \
            f"{m['cores']} CPU cores, {m['device']}, {stamp['generated'][:10]}" in whole
    assert "--readme docs/results.md" in whole
    page.write_text(f"# kept\n\n{README_START}\nold\n{README_END}\n\nkept too\n")
    write_results_page(page, report)
    assert page.read_text() == f"# kept\n\n{readme_section(report)}\n\nkept too\n"
    assert results_json_copy(page) == tmp_path / "bench" / "results.json"
    assert results_json_copy(tmp_path / "README.md") == tmp_path / "bench" / "results.json"


def test_results_section_takes_its_counts_from_the_report() -> None:
    from aselect.pipelines.benchmark import readme_section, to_markdown

    report = json.loads((ROOT / "bench" / "results.json").read_text())
    config = report["configs"][0]
    for point in config["confidence_curve"]:
        point["resamples"] = 37
        point["subsets"] = 1 if point is config["confidence_curve"][-1] else 5
    config["scaling"] = {"points": [{"fraction": f, "images": 10, "dump_seconds": 1.0, "score_seconds": 1.0,
                                     "pairs": 4, "dump_ratio_to_full": 1.0, "score_ratio_to_full": 1.0}
                                    for f in (0.5, 1.0)],
                         "scoring_seconds_by_workers": {"1": 2.0, "3": 1.0}, "dask_speedup": 2.0,
                         "speedup_workers": 3}
    report["configs"] = [config]
    section = readme_section(report)
    assert "share of 37 bootstrap resamples" in section and "averaged over 5 random C-image subsets" in section
    assert "(at 0.5 N, 1 N)" in section and "3-worker speedup 2.00x" in section
    assert "(37 bootstrap resamples at each C" in to_markdown(report)
    assert "200 bootstrap" not in section and "2 Dask workers" not in section
