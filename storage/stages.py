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
import re
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
WORKDIR_MARKER = ".aselect-workdir"  # at a workdir's root: written when aselect first uses the directory
Status = Literal["complete", "partial", "missing", "damaged"]  # damaged: complete, but files missing or changed
KEY_PATTERN = re.compile(r"^[0-9a-f]{16}$")  # what stage_key returns
SHA256 = re.compile(r"^[0-9a-f]{64}$")

# What a reused stage's files are checked with (`StageDir.damage(full=None)`): sizes always; sha256 of every file
# up to SMALL_FILE (results, model weights, probe heads, JSON), and of every file when hashing all of them is
# estimated to cost at most REUSE_HASH_SHARE of the stage's own compute seconds (or REUSE_HASH_FLOOR_S). The rate
# is conservative: sha256 ran at 1.1 GiB/s on the 2-core test host (`openssl speed -evp sha256`, 2026-12-02).
SMALL_FILE = 64 * 2**20
HASH_BYTES_PER_SECOND = 400 * 2**20
REUSE_HASH_SHARE = 0.05
REUSE_HASH_FLOOR_S = 1.0
NUMBER = (int, float)
# Manifest fields that code reads, and the JSON types they must have (a stage's own fields are its own business).
MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "key": (str,), "status": (str,), "summary": (str,), "inputs": (dict,), "files": (dict,),
    "started": NUMBER, "finished": NUMBER, "seconds": NUMBER, "attempts": (int,), "bytes": (int,), "pid": (int,),
    "accounting": (dict,), "probe_fits": (int,), "model": (dict,), "digest": (str,),
}


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
    unreadable or malformed (its item is then computed again)."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {"bytes": record} if isinstance(record, int) else {}  # records before checksums held a number
    files = record.get("files", {})
    if not isinstance(files, dict) or any(files_entry_error(v) for v in files.values()):
        return {}
    return record


def files_entry_error(entry: Any) -> str:
    """What is wrong with one [size, sha256] entry of a manifest or record ('' when nothing)."""
    if not isinstance(entry, list) or len(entry) != 2:
        return f"is {_shown(entry)}, not [size, sha256]"
    size, sha = entry
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"has size {_shown(size)}, not a byte count"
    if not isinstance(sha, str) or not SHA256.match(sha):
        return f"has sha256 {_shown(sha)}, not 64 hex digits"
    return ""


def _shown(value: Any) -> str:
    """A value as an error line shows it: short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest, or an AselectError naming its file and the first field whose type is wrong."""
    for name, types in MANIFEST_TYPES.items():
        value = manifest.get(name)
        if name in manifest and (not isinstance(value, types) or isinstance(value, bool)):
            wanted = " or ".join({"str": "a string", "dict": "an object", "int": "an integer",
                                  "float": "a number"}[t.__name__] for t in types)
            raise AselectError(f"{path}: field {name!r} is {_shown(value)}, expected {wanted}; remove the stage "
                               f"directory {path.parent} to compute it again")
    for rel, entry in manifest.get("files", {}).items():
        if problem := files_entry_error(entry):
            raise AselectError(f"{path}: field 'files' entry {rel!r} {problem}; remove the stage directory "
                               f"{path.parent} to compute it again")
    return manifest


def self_digest(record: dict[str, Any]) -> str:
    """sha256 of a JSON record without its own `digest` field: a complete manifest (or a kept benchmark report)
    records it, so a record changed after it was written is damage like a changed file."""
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != "digest"}, default=str))
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def damaged_files(stage_path: Path, files: Mapping[str, list], full: bool | int = False) -> list[str]:
    """The listed files that are missing or changed: size by default, size and sha256 with `full` (True: every
    file; a number: files of at most that many bytes)."""
    bad = []
    for rel, (size, sha) in files.items():
        path = stage_path / rel
        hashed = full is True or (full is not False and size <= full)
        try:
            if path.stat().st_size != size or (hashed and file_digest(path)[1] != sha):
                bad.append(rel)
        except OSError:
            bad.append(rel)
    return bad


def reuse_hash_limit(total_bytes: int, compute_seconds: float) -> bool | int:
    """The `full` of `damaged_files` for a reuse check: every file when hashing them all is cheap next to
    recomputing the stage, else files up to SMALL_FILE."""
    budget = max(REUSE_HASH_FLOOR_S, REUSE_HASH_SHARE * max(compute_seconds, 0.0))
    return True if total_bytes / HASH_BYTES_PER_SECOND <= budget else SMALL_FILE


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
        """The manifest (None when there is none); one whose fields have the wrong types is an AselectError."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, OSError):  # not JSON, not UTF-8, unreadable
            return {"status": "partial", "summary": "unreadable manifest"}
        if not isinstance(manifest, dict):
            return {"status": "partial", "summary": f"unreadable manifest (a JSON {type(manifest).__name__})"}
        return check_manifest(self.manifest_path, manifest)

    def status(self) -> Status:
        manifest = self.read_manifest()
        if manifest is None:
            return "partial" if self.path.exists() else "missing"
        return "complete" if manifest.get("status") == "complete" else "partial"

    def is_complete(self) -> bool:
        return self.status() == "complete"

    def begin(self, inputs: Mapping[str, Any]) -> None:
        """Create the directory (and the workdir's marker) and record that work started (status partial)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AselectError(f"{self.path}: cannot create stage directory ({exc.strerror or exc})") from None
        mark_workdir(self.path.parent.parent)
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
        manifest["digest"] = self_digest(manifest)
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

    def damage(self, full: bool | None = False) -> list[str]:
        """Files of a complete stage that are missing or changed since it finished, its own and those its
        completion records vouch for, and its manifest if that changed. Sizes by default; sha256 too with `full`;
        `full=None` is the check before a reuse (`reuse_hash_limit`). [] when intact (or not complete)."""
        manifest = self.read_manifest() or {}
        if manifest.get("status") != "complete":
            return []
        bad = [MANIFEST] if "digest" in manifest and manifest["digest"] != self_digest(manifest) else []
        records = self._records()
        limit: bool | int = bool(full)
        if full is None:
            listed = [*manifest.get("files", {}).values(),
                      *(entry for record in records.values() for entry in record.get("files", {}).values())]
            limit = reuse_hash_limit(sum(size for size, _ in listed), float(manifest.get("seconds", 0.0)))
        bad += damaged_files(self.path, manifest.get("files", {}), limit)
        return bad + self._record_damage(records, limit)

    def item_damage(self) -> list[str]:
        """What the completion records of a partial stage vouch for that is missing or changed (the check before
        a resume reuses its finished items)."""
        records = self._records()
        listed = [entry for record in records.values() for entry in record.get("files", {}).values()]
        return self._record_damage(records, reuse_hash_limit(sum(size for size, _ in listed), 0.0))

    def _record_damage(self, records: dict[str, dict], full: bool | int) -> list[str]:
        bad = []
        for name, record in records.items():
            bad += damaged_files(self.path, record.get("files", {}), full) if record else [f"{RECORDS_DIR}/{name}"]
        return bad

    def reopen(self, damaged: list[str] | None = None) -> None:
        """A damaged stage becomes computable again. When everything `damaged` is vouched for by completion
        records (or is a record or the manifest), those items' records are removed, so only they are recomputed;
        any other damage starts the stage over."""
        records = self._records() if (self.path / RECORDS_DIR).is_dir() else None
        if records is None:
            self.reset()
            return
        bad = set(damaged or [])
        names = {name for name, record in records.items()
                 if f"{RECORDS_DIR}/{name}" in bad or bad & set(record.get("files", {}))}
        covered = {f"{RECORDS_DIR}/{name}" for name in names} | {
            rel for name in names for rel in records[name].get("files", {})} | {MANIFEST}
        if bad - covered:  # a file no record vouches for (the store's metadata): start over
            self.reset()
            return
        for name in sorted(names):
            (self.path / RECORDS_DIR / name).unlink(missing_ok=True)
        manifest = self.read_manifest() or {}
        if manifest:
            manifest["status"] = "partial"
            manifest.pop("digest", None)
            write_json_atomic(self.manifest_path, manifest)

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


def mark_workdir(root: Path) -> None:
    """Write the workdir marker once (never rewritten: a finished workdir's files stay as they are)."""
    marker = root / WORKDIR_MARKER
    if not marker.is_file():
        with contextlib.suppress(OSError):  # a workdir that cannot take it still works: it holds stages
            write_json_atomic(marker, {"aselect": "workdir", "created": time.time()})


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
        given = Path(root).expanduser()
        try:
            self.root = given.resolve()
        except RuntimeError:  # Python before 3.13 says "Symlink loop" this way
            raise AselectError(f"{given}: workdir path is a symlink loop") from None
        except OSError as exc:
            reason = "a symlink loop" if exc.errno == errno.ELOOP else f"unusable ({exc.strerror or exc})"
            raise AselectError(f"{given}: workdir path is {reason}") from None

    def check_writable(self) -> None:
        """Fail early, in one line, when the workdir cannot hold stages or is another program's non-empty directory
        (so a run never scatters stages into, say, a home directory); mark it as an aselect workdir."""
        if self.root.exists() and not self.root.is_dir():
            raise AselectError(f"{self.root}: workdir path is a file, not a directory")
        if self.root.is_dir() and not self._is_aselect() and self._holds_other_files():
            raise AselectError(f"{self.root}: not an aselect workdir (it holds other files, no {WORKDIR_MARKER} and "
                               f"no stage directories); pass a new or empty directory, or the --workdir of a run")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            reason = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else exc.strerror
            raise AselectError(f"{self.root}: workdir is not writable ({reason})") from None
        mark_workdir(self.root)

    def check_readable(self) -> None:
        """Fail in one line unless the workdir exists, can be listed, and is an aselect workdir: it has the marker
        or holds stage directories (workdirs from before the marker have only the latter)."""
        if not self.root.exists():
            raise AselectError(f"{self.root}: no such workdir")
        if not self.root.is_dir():
            raise AselectError(f"{self.root}: workdir path is a file, not a directory")
        try:
            next(os.scandir(self.root), None)
        except OSError as exc:
            raise AselectError(f"{self.root}: workdir is not readable ({exc.strerror or exc})") from None
        if not self._is_aselect():
            raise AselectError(f"{self.root}: not an aselect workdir (no {WORKDIR_MARKER} and no stage directories); "
                               f"pass the --workdir of a run")

    def _is_aselect(self) -> bool:
        """Whether aselect made the directory: it has the marker, or stage directories (workdirs from before the
        marker have only the latter)."""
        if (self.root / WORKDIR_MARKER).is_file():
            return True
        # a stage key alone is 16 hex digits, which other programs' caches use too: a stage also has its manifest
        return any(KEY_PATTERN.match(p.name) and (p / MANIFEST).is_file() for p in self._stage_paths())

    def _holds_other_files(self) -> bool:
        """Whether the directory holds anything but what `check_writable` itself may have left there when killed
        (its write test, a half-written marker)."""
        own = (".write-test-", f".{WORKDIR_MARKER}.")
        try:
            with os.scandir(self.root) as entries:
                return any(not entry.name.startswith(own) for entry in entries)
        except OSError as exc:
            raise AselectError(f"{self.root}: workdir is not readable ({exc.strerror or exc})") from None

    def _stage_paths(self, name: str | None = None) -> list[Path]:
        """`<name>/<key>` directories that are stages: with a manifest, or named by a stage key."""
        found = []
        for path in self.root.glob(f"{name}/*" if name else "*/*"):
            with contextlib.suppress(OSError):
                if path.parent.name.startswith(".") or not path.is_dir():
                    continue
                if KEY_PATTERN.match(path.name) or (path / MANIFEST).is_file():
                    found.append(path)
        return found

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
        for path in self._stage_paths(name):
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
