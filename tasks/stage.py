"""What every stage task shares: the lock-check-begin-work-complete body, validation of finished stages against
disk, and artifacts.

Whether a stage is done is decided in one place: its manifest (`storage.stages.StageDir.is_complete`). The task
always runs; a finished stage's task reads its results back from the stage directory and ends in a Completed
state named `Cached`, so Prefect's UI and API show the reuse, while Prefect keeps no result records of its own
that could disagree with the files."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from aselect.storage.stages import StageDir, StageRef, Workdir

log = logging.getLogger("aselect.stage")


@dataclass
class Finished:
    """What a stage's work leaves: its one-line summary, the fields its manifest records, and what the task
    returns besides the summary."""

    summary: str
    manifest: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


CACHED = "Cached"  # the state name of a task whose stage was already finished on disk


def stage_body(stage: StageRef, inputs: dict[str, Any], work: Callable[[StageDir], Finished],
               reuse: Callable[[StageDir], dict[str, Any]] | None = None,
               artifact: Callable[[Finished], None] | None = None) -> State:
    """The body of every stage task: under the stage's lock, what it would reuse is verified first
    (`verify_before_reuse`), then a finished stage is read back (`reuse` reads the
    task's extra return values from disk) into a `Cached` state; else begin with `inputs`, `work`, and complete
    with its manifest fields; then the optional artifact (never fatal) and the log line. The state's data is
    the task's result: `{"summary", **extra}`."""
    with stage.dir.lock():
        verify_before_reuse(stage.dir)
        if stage.dir.is_complete():  # finished by an earlier run, or by another run while we waited for the lock
            # the result is read from the files just verified: nothing else (no Prefect result) is a source of it
            result = {"summary": stage.dir.read_manifest()["summary"], **(reuse(stage.dir) if reuse else {})}
            get_run_logger().info("%s %s: finished earlier, reused: %s", stage.name, stage.key, result["summary"])
            return Completed(name=CACHED, message="finished earlier; read from the stage directory", data=result)
        stage.dir.begin(inputs)
        done = work(stage.dir)
        stage.dir.complete(done.summary, **done.manifest)
    if artifact is not None:
        try:
            artifact(done)
        except Exception as exc:  # artifacts are a convenience: the stage directory says the same
            log.warning("%s %s: its artifact was not written (%s)", stage.name, stage.key, exc)
    get_run_logger().info("%s %s: %s", stage.name, stage.key, done.summary)
    return Completed(data={"summary": done.summary, **done.result})


def verify_before_reuse(stage: StageDir) -> list[str]:
    """Check what a stage would reuse against what it recorded (call under its lock); returns what was damaged.

    A complete stage: sizes of every file, sha256 of small ones (results, weights, heads) and of all when that
    is cheap next to recomputing it (`StageDir.damage(full=None)`), and its manifest's own digest. A partial
    stage's completion records likewise, before a resume reuses their items. Damage is logged, file by file, and
    reopens the stage: a dump recomputes only the damaged items, any other stage starts over."""
    complete = stage.is_complete()
    damaged = stage.damage(full=None) if complete else stage.item_damage()
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        log.warning("%s %s: %s missing or changed since %s: computing %s again", stage.name, stage.key, shown,
                    "the stage finished" if complete else "its item finished", "it" if complete else "them")
        stage.reopen(damaged)
    return damaged


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
    """Run a stage task; a finished stage whose files are intact is reused, a damaged one computed again
    (`stage_body` verifies it under its lock)."""
    # The manifest decides what is done (stage_body): no Prefect cache or result records beside it.
    configured = stage_task.with_options(name=stage.name, cache_policy=NO_CACHE, persist_result=False)
    started = time.perf_counter()
    state = configured(stage=stage, return_state=True, **inputs)
    result = state.result()  # raises the task's exception when it failed
    report = StageReport(
        name=stage.name, key=stage.key, status=state.name or state.type.value,
        cached=state.name == CACHED, seconds=round(time.perf_counter() - started, 3),
        path=stage.path, summary=str((result or {}).get("summary", "")), result=result or {},
    )
    stage_artifact(report)
    return report


def plan_and_run(stage_task: Task, plan: Callable[..., StageRef], workdir: Workdir, reports: list[StageReport],
                 stage_name: str | None = None, **inputs: Any) -> StageRef:
    """Plan a stage from every input its task gets, run it with them through `run_stage`, and append its report;
    `stage_name` names a stage that reuses another's task (calibrate). The planner takes every input of its task
    and decides, input by input, what enters the key; one it does not know fails here rather than being left out
    of the key unseen."""
    stage = plan(workdir, **inputs, **({"name": stage_name} if stage_name else {}))
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
    except Exception as exc:  # artifacts are a convenience: the manifest on disk says the same
        log.warning("%s %s: its stage artifact was not written (%s)", report.name, report.key, exc)


class ProgressArtifact:
    """A Prefect progress artifact, updated at most every `interval` seconds; silent without an API."""

    def __init__(self, key: str, description: str, interval: float = 2.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._id: UUID | None = None
        try:
            self._id = create_progress_artifact(progress=0.0, key=key, description=description)
        except Exception as exc:  # progress is a convenience: never fail a stage over it
            log.warning("progress artifact %s not created (%s): progress shows in the logs only", key, exc)
            self._id = None

    def update(self, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if self._id is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        try:
            update_progress_artifact(artifact_id=self._id, progress=round(100.0 * min(max(fraction, 0.0), 1.0), 2))
        except Exception as exc:  # as above; stop updating rather than log every step
            log.warning("progress artifact not updated (%s): no further updates this stage", exc)
            self._id = None
