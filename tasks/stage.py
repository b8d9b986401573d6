"""What every stage task shares: the lock-check-begin-work-complete body, the cache key, cache validation
against disk, and artifacts."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from aselect.storage.stages import StageDir, StageRef, Workdir

log = logging.getLogger("aselect.stage")


@dataclass
class Finished:
    """What a stage's work leaves: its one-line summary, the fields its manifest records, and what the task
    returns besides the summary."""

    summary: str
    manifest: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def stage_body(stage: StageRef, inputs: dict[str, Any], work: Callable[[StageDir], Finished],
               reuse: Callable[[StageDir], dict[str, Any]] | None = None,
               artifact: Callable[[Finished], None] | None = None) -> dict[str, Any]:
    """The body of every stage task: under the stage's lock, reuse what another run finished meanwhile (`reuse`
    reads the task's extra return values back from disk), else begin with `inputs`, `work`, and complete with
    its manifest fields; then the optional artifact (never fatal) and the log line."""
    with stage.dir.lock():
        if stage.dir.is_complete():  # another run finished it while we waited for the lock
            return {"summary": stage.dir.read_manifest()["summary"], **(reuse(stage.dir) if reuse else {})}
        stage.dir.begin(inputs)
        done = work(stage.dir)
        stage.dir.complete(done.summary, **done.manifest)
    if artifact is not None:
        try:
            artifact(done)
        except Exception:  # artifacts are a convenience: the stage directory says the same
            pass
    get_run_logger().info("%s %s: %s", stage.name, stage.key, done.summary)
    return {"summary": done.summary, **done.result}


@dataclass(frozen=True)
class StageCost:
    """What a finished stage recorded of its cost: forward-pass inputs (images x timesteps x inputs per image, for
    dumps), linear probes trained, and its own compute seconds."""

    forward_passes: int
    probe_fits: int
    seconds: float

    @classmethod
    def of(cls, stage: StageRef) -> StageCost:
        """The cost recorded in a finished stage's manifest (zeros for what it did not do)."""
        manifest = stage.dir.read_manifest() or {}
        return cls(int((manifest.get("accounting") or {}).get("images_timesteps", 0)),
                   int(manifest.get("probe_fits", 0)), float(manifest.get("seconds", 0.0)))


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect's cache key is the stage key: no run id, so a new run reuses finished stages."""
    return parameters["stage"].cache_key


@dataclass(frozen=True)
class StageReport:
    """One stage of one run, as `aselect run --json` prints it."""

    name: str
    key: str
    status: str  # the Prefect state name: Completed, Cached, Failed
    cached: bool
    seconds: float
    path: str
    summary: str
    result: dict[str, Any] = field(default_factory=dict, repr=False)  # the task's return value

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "result"}


def run_stage(stage_task: Task, stage: StageRef, workdir: Workdir, **inputs: Any) -> StageReport:
    """Run a stage task through Prefect's cache, refreshing it when the stage's data is gone."""
    # A cached result only points at data on disk: if that data was deleted, damaged (a file missing or
    # resized since the stage finished) or never finished, the cache record is stale, so the task must run
    # again and overwrite it. A dump recomputes only its damaged items; other stages start over.
    if stage.dir.is_complete():
        with stage.dir.lock():  # not while another run is finishing or repairing it
            damaged = stage.dir.damage()
            if damaged:
                shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
                log.warning("%s %s: %s missing or changed since the stage finished: computing it again",
                            stage.name, stage.key, shown)
                stage.dir.reopen()
    fresh_on_disk = stage.dir.is_complete()
    configured = stage_task.with_options(
        name=stage.name,
        cache_key_fn=stage_cache_key,
        refresh_cache=not fresh_on_disk,
        persist_result=True,
        result_storage=workdir.results_dir,
        result_serializer="json",
    )
    started = time.perf_counter()
    state = configured(stage=stage, return_state=True, **inputs)
    result = state.result()  # raises the task's exception when it failed
    report = StageReport(
        name=stage.name, key=stage.key, status=state.name or state.type.value,
        cached=state.name == "Cached", seconds=round(time.perf_counter() - started, 3),
        path=stage.path, summary=str((result or {}).get("summary", "")), result=result or {},
    )
    stage_artifact(report)
    return report


def plan_and_run(stage_task: Task, plan: Callable[..., StageRef], workdir: Workdir, reports: list[StageReport],
                 stage_name: str | None = None, **inputs: Any) -> StageRef:
    """Plan a stage from the inputs its planner reads (what its key covers), run it with all of them through
    `run_stage`, and append its report; `stage_name` names a stage that reuses another's task (calibrate)."""
    keyed = {k: v for k, v in inputs.items() if k in inspect.signature(plan).parameters}
    stage = plan(workdir, **keyed, **({"name": stage_name} if stage_name else {}))
    reports.append(run_stage(stage_task, stage, workdir, **inputs))
    return stage


def stage_artifact(report: StageReport) -> None:
    """A markdown artifact per stage (key `stage-<name>`): key, state, inputs, timings, size, directory."""
    manifest = StageRef(report.name, report.key, report.path).dir.read_manifest() or {}
    inputs = manifest.get("inputs", {})
    lines = [
        f"## {report.name} `{report.key}`", "", report.summary, "",
        "| field | value |", "| --- | --- |",
        f"| state | {report.status} |",
        f"| seconds (this run) | {report.seconds} |",
        f"| seconds (compute) | {manifest.get('seconds', '-')} |",
        f"| size | {manifest.get('bytes', 0) / 2**20:.2f} MiB |",
        f"| upstream | {', '.join(f'{k} `{v}`' for k, v in inputs.get('upstream', {}).items()) or '-'} |",
        f"| directory | [{report.path}](file://{report.path}) |",
    ]
    try:
        create_markdown_artifact(key=f"stage-{report.name}", markdown="\n".join(lines) + "\n",
                                 description=f"{report.name}: {report.summary[:120]}")
    except Exception:  # artifacts are a convenience: the manifest on disk says the same
        pass


class ProgressArtifact:
    """A Prefect progress artifact, updated at most every `interval` seconds; silent without an API."""

    def __init__(self, key: str, description: str, interval: float = 2.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._id: UUID | None = None
        try:
            self._id = create_progress_artifact(progress=0.0, key=key, description=description)
        except Exception:  # progress is a convenience: never fail a stage over it
            self._id = None

    def update(self, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if self._id is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        try:
            update_progress_artifact(artifact_id=self._id, progress=round(100.0 * min(max(fraction, 0.0), 1.0), 2))
        except Exception:
            pass
