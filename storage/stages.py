"""Stage directories: `<workdir>/<stage>/<key>/` with a manifest, a lock and the stage's data.

A stage is *complete* only once its manifest says so; the manifest is written last and atomically,
so a killed stage is *partial* and is resumed or redone, never mistaken for finished work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from aselect.storage.errors import AselectError
from aselect.storage.faults import failpoint

log = logging.getLogger("aselect.stage")

MANIFEST = "manifest.json"
RECORDS_DIR = "done"  # per-item completion records of stages that resume item by item (the dumps)
Status = Literal["complete", "partial", "missing", "damaged"]  # damaged: complete, but files missing or changed


# ---------------------------------------------------------------------------------------------
#                                         Keys
# ---------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal inputs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(name: str, section: Mapping[str, Any], upstream: Mapping[str, str], code: str,
              extra: str = "") -> str:
    """Key of a stage: a hash of its config section, its upstream keys, the digest of the code that computes it
    (`storage.code.code_digest`) and `extra` (e.g. the content of a source it reads)."""
    payload = canonical_json({"stage": name, "section": section, "upstream": dict(upstream),
                              "code": code, "extra": extra})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageRef:
    """What flows pass around: a stage's name, key and directory (small and JSON-serialisable)."""

    name: str
    key: str
    path: str

    @property
    def dir(self) -> StageDir:
        return StageDir(Path(self.path), self.name, self.key)


# ---------------------------------------------------------------------------------------------
#                                       Stage directories
# ---------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_digest(path: Path) -> list:
    """[size, sha256] of a file: what a manifest or completion record says was finished."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return [path.stat().st_size, digest.hexdigest()]


def read_record(marker: Path) -> dict:
    """A completion record (`done/...`): {"bytes", "files": {path under the stage: [size, sha256]}}; {} if
    unreadable."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {"bytes": record}  # records before checksums held a number


def damaged_files(stage_path: Path, files: Mapping[str, list], full: bool = False) -> list[str]:
    """The listed files that are missing or changed: size by default, size and sha256 with `full`."""
    bad = []
    for rel, (size, sha) in files.items():
        path = stage_path / rel
        try:
            if path.stat().st_size != size or (full and file_digest(path)[1] != sha):
                bad.append(rel)
        except OSError:
            bad.append(rel)
    return bad


def dir_size(path: Path) -> int:
    """Bytes under a directory (0 if it does not exist); files that vanish while it counts (a checkpoint
    renamed by a running stage) are skipped."""
    total = 0
    for p in path.rglob("*") if path.is_dir() else []:
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


@dataclass(frozen=True)
class StageDir:
    """One stage's directory; it knows its manifest, status and lock."""

    path: Path
    name: str
    key: str

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def ref(self) -> StageRef:
        return StageRef(self.name, self.key, str(self.path))

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, OSError):  # not JSON, not UTF-8, unreadable
            return {"status": "partial", "summary": "unreadable manifest"}
        if not isinstance(manifest, dict):
            return {"status": "partial", "summary": f"unreadable manifest (a JSON {type(manifest).__name__})"}
        return manifest

    def status(self) -> Status:
        manifest = self.read_manifest()
        if manifest is None:
            return "partial" if self.path.exists() else "missing"
        return "complete" if manifest.get("status") == "complete" else "partial"

    def is_complete(self) -> bool:
        return self.status() == "complete"

    def begin(self, inputs: Mapping[str, Any]) -> None:
        """Create the directory and record that work started (status partial)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AselectError(f"{self.path}: cannot create stage directory ({exc.strerror or exc})") from None
        previous = self.read_manifest() or {}
        write_json_atomic(self.manifest_path, {
            "stage": self.name, "key": self.key, "inputs": dict(inputs), "status": "partial",
            "started": time.time(), "attempts": int(previous.get("attempts", 0)) + 1, "pid": os.getpid(),
        })

    def complete(self, summary: str, **details: Any) -> dict[str, Any]:
        """Mark the stage complete: written last, so a crash before this line leaves it partial.

        The manifest lists [size, sha256] of every file the stage holds, except the chunk files its completion
        records already vouch for, so later runs can tell a damaged stage from a finished one.
        """
        failpoint(self.name)  # crash tests: killed here, the stage must stay partial
        manifest = self.read_manifest() or {"stage": self.name, "key": self.key, "started": time.time()}
        finished = time.time()
        manifest.update(details)
        manifest.update({
            "status": "complete", "finished": finished, "summary": summary,
            "seconds": round(finished - float(manifest.get("started", finished)), 3),
            "bytes": dir_size(self.path), "files": self._digests(),
        })
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    def _records(self) -> dict[str, dict]:
        records = self.path / RECORDS_DIR
        return {m.name: read_record(m) for m in sorted(records.glob("[!.]*"))} if records.is_dir() else {}

    def _digests(self) -> dict[str, list]:
        covered = {rel for record in self._records().values() for rel in record.get("files", {})}
        digests = {}
        for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = path.relative_to(self.path).as_posix()
            hidden = any(part.startswith(".") for part in rel.split("/"))  # temporaries of atomic writes
            if rel != MANIFEST and not rel.startswith(f"{RECORDS_DIR}/") and rel not in covered and not hidden:
                digests[rel] = file_digest(path)
        return digests

    def damage(self, full: bool = False) -> list[str]:
        """Files of a complete stage that are missing or changed since it finished (sizes; sha256 too with
        `full`), its own and those its completion records vouch for. [] when intact (or not complete)."""
        manifest = self.read_manifest() or {}
        if manifest.get("status") != "complete":
            return []
        bad = damaged_files(self.path, manifest.get("files", {}), full)
        for name, record in self._records().items():
            bad += damaged_files(self.path, record.get("files", {}), full) if record else [f"{RECORDS_DIR}/{name}"]
        return bad

    def reopen(self) -> None:
        """A damaged complete stage becomes computable again: a stage with completion records keeps its intact
        items (the rest are recomputed), any other starts over."""
        if (self.path / RECORDS_DIR).is_dir():
            manifest = self.read_manifest() or {}
            manifest["status"] = "partial"
            write_json_atomic(self.manifest_path, manifest)
        else:
            self.reset()

    def reset(self) -> None:
        """Remove a partial stage's files (used by stages that cannot resume)."""
        if self.path.exists():
            shutil.rmtree(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on this stage (a second run waits here and then finds the work done)."""
        lock_path = self.path.parent.parent / ".locks" / f"{self.name}-{self.key}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(lock_path, "a+")
        except OSError as exc:
            raise AselectError(f"{lock_path.parent}: cannot write to workdir ({exc.strerror or exc})") from None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another run holds it: say who, then wait
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                log.info("%s %s: waiting for the run that holds its lock (%s)", self.name, self.key, holder)
                started = time.monotonic()
                fcntl.flock(fh, fcntl.LOCK_EX)
                log.info("%s %s: lock acquired after %.0f s", self.name, self.key, time.monotonic() - started)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
            fh.flush()
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
#                                          Workdir
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInfo:
    """One line of `aselect inspect`."""

    name: str
    key: str
    status: Status
    bytes: int
    age_seconds: float | None
    summary: str
    path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Workdir:
    """The root that holds every stage, plus the Prefect result store used for task caching."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def check_writable(self) -> None:
        """Fail early, in one line, when the workdir cannot hold stages."""
        if self.root.exists() and not self.root.is_dir():
            raise AselectError(f"{self.root}: workdir path is a file, not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            reason = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else exc.strerror
            raise AselectError(f"{self.root}: workdir is not writable ({reason})") from None

    def stage(self, name: str, key: str) -> StageDir:
        return StageDir(self.root / name / key, name, key)

    def adopt(self, stage: StageRef) -> StageRef:
        """Link a complete stage of another workdir into this one (hard links, so no data is copied)."""
        source = stage.dir
        if not source.is_complete():
            raise AselectError(f"{source.path}: only a complete stage can be adopted (status {source.status()})")
        target = self.stage(stage.name, stage.key)
        if not target.path.exists():
            tmp = target.path.with_name(f".{target.key}.adopt-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(source.path, tmp, copy_function=os.link)
            except OSError:  # another filesystem: copy instead
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(source.path, tmp)
            tmp.rename(target.path)
        return target.ref()

    def stages(self, name: str | None = None) -> list[StageInfo]:
        """Every stage directory under the workdir (optionally of one stage name), newest first."""
        infos = []
        pattern = f"{name}/*" if name else "*/*"
        for path in self.root.glob(pattern):
            if not path.is_dir() or path.parent.name.startswith("."):
                continue
            stage = StageDir(path, path.parent.name, path.name)
            manifest = stage.read_manifest() or {}
            status = stage.status()
            if status == "complete" and stage.damage():
                status = "damaged"
            stamp = manifest.get("finished") or manifest.get("started")
            infos.append(StageInfo(
                name=stage.name, key=stage.key, status=status, bytes=dir_size(path),
                age_seconds=round(time.time() - float(stamp), 1) if stamp else None,
                summary=str(manifest.get("summary", "")), path=str(path),
            ))
        return sorted(infos, key=lambda i: (i.age_seconds is None, i.age_seconds or 0.0))
