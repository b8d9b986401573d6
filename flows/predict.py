"""The `aselect-predict` flow: a finished run of a workdir applied to new image files and folders, the table (and
mask PNGs) written to `out`, and a `predictions` artifact with the counts and the first rows."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from aselect.pipelines.predict import describe
from aselect.tasks.predict import predict

# Flow parameters: an empty list of paths is refused when the run is submitted.
ImagePaths = Annotated[list[str], Field(min_length=1, description="image files (.png, .jpg, .jpeg) or folders")]


def markdown(summary: dict[str, Any]) -> str:
    """The `predictions` artifact: what was predicted with which run, the images per class and the first rows."""
    lines = [f"{describe(summary)}", "", f"Run `{summary['run']}` of `{summary['flow']}`; table: "
             f"`{summary['table'] or 'none'}`.", ""]
    if summary["counts"]:
        lines += ["| class | images |", "| --- | --- |"]
        lines += [f"| {name} | {count} |" for name, count in sorted(summary["counts"].items())] + [""]
    if summary["head"]:
        columns = list(summary["head"][0])
        lines += [f"First {len(summary['head'])} rows:", "", "| " + " | ".join(columns) + " |",
                  "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in summary["head"]] + [""]
    if summary["skipped_files"]:
        lines += ["Skipped:", "", *(f"- {message}" for message in summary["skipped_files"]), ""]
    return "\n".join(lines)


@flow(name="aselect-predict")
def aselect_predict(paths: ImagePaths, workdir: str = "aselect-work", run: str | None = None,
                    out: str | None = None, as_json: bool = False, skip_bad: bool = False) -> dict[str, Any]:
    """Apply the newest finished run of `workdir` (or the one whose key starts with `run`) to image files."""
    logger = get_run_logger()
    summary = predict(list(paths), workdir, run, out, as_json, skip_bad)
    try:
        create_markdown_artifact(key="predictions", markdown=markdown(summary),
                                 description=f"{summary['images']} images with run {summary['run'][:12]}")
    except Exception as exc:  # artifacts are a convenience; the table in `out` says the same
        logger.warning("predictions artifact not written (%s: %s); %s has the same", type(exc).__name__, exc,
                       summary["table"] or summary["out"])
    return summary


if __name__ == "__main__":
    import sys

    aselect_predict(sys.argv[1:] or ["aselect-work/predict-inbox"])
