"""The `aselect` command line: `run` a config through the flow, `inspect` the stages in a workdir, `predict` with a
finished run."""

from __future__ import annotations

import _thread
import argparse
import atexit
import contextlib
import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

# Before Prefect is imported: route aselect's own loggers through Prefect and keep runs private.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "aselect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect's temporary server gets 20 s to start by default; on a busy host (a benchmark beside a test run,
# 2 cores) its first start with database migrations was measured taking longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from aselect.storage.errors import AselectError  # noqa: E402
from aselect.storage.stages import Workdir  # noqa: E402

# ---------------------------------------------------------------------------------------------
#                                   Errors without tracebacks
# ---------------------------------------------------------------------------------------------


# A write the storage refused: full, over a quota, read-only, failing, or a file past the size limit.
IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)
# torch.save reports a refused write as a RuntimeError of its C++ writer, without errno or file name.
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


def _written_file(exc: BaseException) -> str | None:
    """The file a failed write was writing: the error's own file name, else the innermost one its traceback shows
    being written (torch.save's target, or a file object open for writing)."""
    if getattr(exc, "filename", None):
        return str(exc.filename)
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        if frame.f_code.co_name == "save" and frame.f_globals.get("__name__") == "torch.serialization":
            target = frame.f_locals.get("f")
            if isinstance(target, str | os.PathLike):
                return os.fspath(target)
        for value in frame.f_locals.values():
            mode = getattr(value, "mode", "")
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str) and isinstance(
                    mode, str) and set(mode) & set("wax+"):
                return value.name
    return None


def io_failure(exc: BaseException) -> str | None:
    """The one line for a write the storage refused (`exc`, or what it was raised from), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "I/O error")
            break
        if isinstance(exc, RuntimeError) and any(text in str(exc) for text in TORCH_WRITE_FAILED):
            reason = "the write failed (a full disk, a quota, or a failing device)"
            break
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    else:
        return None
    return (f"{_written_file(exc) or 'the workdir'}: {reason}; finished stages and chunks are kept, rerun to "
            f"resume")


class HideUserErrorTracebacks(logging.Filter):
    """Drop the traceback from log records about an AselectError or a refused write: its one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (isinstance(record.exc_info[1], AselectError)
                                or (record.exc_info[1] is not None and io_failure(record.exc_info[1]))):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Attach the filter to every console handler Prefect configured."""
    quiet = HideUserErrorTracebacks()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "aselect"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(quiet)


# ---------------------------------------------------------------------------------------------
#                                          Commands
# ---------------------------------------------------------------------------------------------


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


# Seconds a PREFECT_API_URL gets to answer before a run starts (less when PREFECT_API_REQUEST_TIMEOUT is lower):
# Prefect's own client waits 60 s per request and retries, silently.
API_CHECK_SECONDS = 10.0


def check_prefect_api() -> None:
    """A PREFECT_API_URL that refuses connections or never answers: one line within seconds, before a run starts.

    Read from the environment first, so the check needs no Prefect import; else from Prefect's profile."""
    url, timeout = os.environ.get("PREFECT_API_URL"), os.environ.get("PREFECT_API_REQUEST_TIMEOUT")
    if not url:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        url, timeout = settings.api.url, settings.api.request_timeout
    if not url:  # Prefect's temporary server: ours to start
        return
    import ssl
    import urllib.error
    import urllib.request

    try:
        seconds = min(API_CHECK_SECONDS, float(timeout or API_CHECK_SECONDS))
    except ValueError:
        seconds = API_CHECK_SECONDS
    advice = "start that server (`make serve`) or unset PREFECT_API_URL for a temporary one"
    unverified = ssl._create_unverified_context()  # reachability only: Prefect's client checks TLS itself
    try:  # any HTTP answer will do, an error status included
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=seconds, context=unverified).close()
    except urllib.error.HTTPError:
        return
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            raise AselectError(f"PREFECT_API_URL {url}: no answer within {seconds:g} s; {advice}") from None
        shown = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise AselectError(f"PREFECT_API_URL {url}: cannot connect ({shown}); {advice}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from aselect.flows.pipeline import (  # Prefect, torch, diffusers
        aselect_exhaustive,
        aselect_pipeline,
        resolve_run_config,
    )

    resolve_run_config(args.config, args.set, args.workdir)  # a bad config fails here, before any run starts
    quiet_user_errors()
    flow = aselect_exhaustive if args.exhaustive else aselect_pipeline
    result: dict[str, Any] = flow(config=args.config, overrides=args.set, workdir=args.workdir)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    policy = (result.get("selection") or {}).get("policy", "-")
    print(f"aselect run {result['config']} ({result['flow']}, policy {policy}, workdir {result['workdir']})")
    for s in result["stages"]:
        print(f"  {s['name']:<10} {s['key']}  {s['status']:<10} {s['seconds']:>8.2f}s  {s['summary']}")
    if result.get("selection"):
        sel, met = result["selection"], result["metrics"]
        print(f"selected t={sel['timestep']} layer {sel['layer']} {sel['site']}: {met['metric']} {met['value']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from aselect.flows.benchmark import DEFAULT_CONFIGS, aselect_benchmark  # Prefect, torch, diffusers
    from aselect.flows.pipeline import resolve_run_config
    from aselect.pipelines.benchmark import (
        check_reused_config,
        results_json_copy,
        reused_reports,
        to_markdown,
        write_results_page,
    )

    configs = args.configs or list(DEFAULT_CONFIGS)
    reused = reused_reports([Path(p) for p in args.reuse])  # a bad results file fails here, before anything runs
    for name in configs:  # so does a bad config, or a reused report of another version of it
        check_reused_config(resolve_run_config(name, None, args.workdir), reused)
    quiet_user_errors()
    command = ("aselect bench " + " ".join(configs) + (" --no-scaling" if not args.scaling else "")
               + "".join(f" --reuse {p}" for p in args.reuse))
    report = aselect_benchmark(configs=configs, workdir=args.workdir, scaling=args.scaling,
                               keep_work=args.keep_work, command=command, reuse=[str(p) for p in args.reuse])
    if args.readme:
        page = Path(args.readme)
        copy = results_json_copy(page)
        copy.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in report.items() if k not in ("results", "markdown")}
        copy.write_text(json.dumps(clean, indent=1) + "\n")
        write_results_page(page, clean)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(to_markdown(report))
        print(f"written: {report['results']}, {report['markdown']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    work = Workdir(args.workdir)
    work.check_readable()  # one line for a missing, unreadable or non-aselect directory
    if args.stage:
        name, _, key_prefix = args.stage.partition("/")
        matches = [s for s in work.stages(name) if s.key.startswith(key_prefix)]
        if not matches:
            raise AselectError(f"{args.stage}: no such stage in {work.root}")
        stage = work.stage(matches[0].name, matches[0].key)
        manifest = stage.read_manifest() or {"stage": stage.name, "key": stage.key}
        manifest.update(status=stage.status(), path=str(stage.path))
        files = sorted(p.name for p in stage.path.iterdir() if p.name != "manifest.json")
        manifest["files"] = files
        if args.json:
            print(json.dumps(manifest, default=str))
        else:
            for key in sorted(manifest):
                value = manifest[key]
                if key == "loss_curve" and value:
                    value = f"{len(value)} points, first {value[0]}, last {value[-1]}"
                print(f"{key:>14}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
        return 0
    infos = work.stages()
    if args.json:
        print(json.dumps({"workdir": str(work.root), "stages": [i.as_dict() for i in infos]}))
        return 0
    print(f"{'stage':<10} {'key':<16} {'status':<9} {'size':>10} {'age':>5}  summary")
    for i in infos:
        print(f"{i.name:<10} {i.key:<16} {i.status:<9} {human_size(i.bytes):>10} {human_age(i.age_seconds):>5}  "
              f"{i.summary}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every complete stage (or one) against the sizes and sha256 it recorded when it finished."""
    work = Workdir(args.workdir)
    work.check_readable()
    name, _, key_prefix = (args.stage or "").partition("/")
    infos = [i for i in work.stages(name or None)
             if i.key.startswith(key_prefix) and i.status in ("complete", "damaged")]
    if args.stage and not infos:
        raise AselectError(f"{args.stage}: no complete stage of that name in {work.root}")
    report = []
    for info in infos:
        bad = work.stage(info.name, info.key).damage(full=True)
        report.append({"stage": info.name, "key": info.key, "damaged": bad})
        if not args.json:
            print(f"{info.name:<10} {info.key}  " + ("ok" if not bad else f"DAMAGED: {', '.join(bad[:5])}"
                                                     + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")))
    damaged = [r for r in report if r["damaged"]]
    if args.json:
        print(json.dumps({"workdir": str(work.root), "stages": report}))
    else:
        print(f"{len(report)} complete stages checked, {len(damaged)} damaged"
              + ("; the next `aselect run` recomputes what is damaged" if damaged else ""))
    return 1 if damaged else 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Apply a finished run to image files: classes (CSV or JSON lines) or mask PNGs (segmentation), batch by batch."""
    from tqdm.auto import tqdm

    from aselect.pipelines.predict import describe, load_run, predict_to  # torch, diffusers; no Prefect

    run = load_run(args.workdir, args.run)
    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="predict", unit="image", file=sys.stderr,
                             disable=None if total > run.stream_batch else True))
        bars[0].update(done - bars[0].n)

    def skipped(message: str) -> None:
        (tqdm.write if bars else print)(f"aselect: skipped {message}", file=sys.stderr)

    try:  # the table goes to --out (a file, or beside the masks) or, for a segmentation run, to stdout
        summary = predict_to(run, args.paths, Path(args.out) if args.out else None, as_json=args.json,
                             skip_bad=args.skip_bad, stream=sys.stdout, on_skip=skipped, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"aselect predict: {describe(summary)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aselect", description="Automatic timestep and feature selection "
                                     "for Diffusion Transformer representations (A-SelecT).")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a config (cached stages are reused)")
    run.add_argument("config", nargs="?", default="digits", help="config file or bundled name (default: digits)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    run.add_argument("--workdir", help="where stages are stored (default: the config's workdir)")
    run.add_argument("--exhaustive", action="store_true",
                     help="run the exhaustive grid (the oracle) instead of the A-SelecT path")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="every selector against the exhaustive oracle: regret, cost, scaling")
    bench.add_argument("configs", nargs="*", help="configs to benchmark (default: all ten bundled benchmark configs)")
    bench.add_argument("--workdir", help="where cached stages and bench/ results go (default: the config's)")
    bench.add_argument("--no-scaling", dest="scaling", action="store_false",
                       help="skip the dump/scoring scaling measurements")
    bench.add_argument("--keep-work", action="store_true", help="keep the fresh per-config workdirs for inspection")
    bench.add_argument("--readme", metavar="PAGE", help="also write the results page PAGE (e.g. docs/results.md: "
                       "its section between the bench markers, or the whole page when it has none) and copy "
                       "results.json to bench/ beside it (beside docs/ for a page in docs/)")
    bench.add_argument("--reuse", metavar="RESULTS", action="append", default=[],
                       help="take the reports of configs found in RESULTS (an earlier results.json, e.g. "
                       "bench/results.json) instead of measuring them; the page names the run that measured each "
                       "(repeatable)")
    bench.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench.set_defaults(func=cmd_bench)

    inspect = sub.add_parser("inspect", help="list the stages in a workdir, or show one stage's manifest")
    inspect.add_argument("stage", nargs="?", help="a stage name, or name/key-prefix")
    inspect.add_argument("--workdir", default="aselect-work", help="workdir (default: ./aselect-work)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)

    verify = sub.add_parser("verify", help="check finished stages' files against their recorded sha256 "
                            "(exit 1 if any is damaged)")
    verify.add_argument("stage", nargs="?", help="a stage name, or name/key-prefix (default: every stage)")
    verify.add_argument("--workdir", default="aselect-work", help="workdir (default: ./aselect-work)")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=cmd_verify)

    predict = sub.add_parser("predict", help="apply a finished run (its selected features and probe) to images")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files (.png, .jpg, .jpeg) or folders")
    predict.add_argument("--workdir", default="aselect-work", help="workdir (default: ./aselect-work)")
    predict.add_argument("--run", metavar="KEY", help="the run's probe stage key, or a prefix of it (default: the "
                         "newest finished run)")
    predict.add_argument("--out", metavar="FILE", help="write the table to FILE (default: stdout); for a "
                         "segmentation run, the directory the mask PNGs go to (required)")
    predict.add_argument("--json", action="store_true", help="JSON lines instead of CSV")
    predict.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed on stderr) "
                         "instead of stopping at the first")
    predict.set_defaults(func=cmd_predict)
    return parser


def temporary_server_running() -> bool:
    """Whether Prefect's temporary local server (started when PREFECT_API_URL is unset) is up in this process."""
    if "prefect.server.api.server" not in sys.modules:
        return False
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer().running  # the singleton Prefect's clients start


def flush_prefect_services(stop_server: bool, timeout: float = 10.0) -> None:
    """Finish Prefect's exit work now (queued events and logs, our temporary server) so none prints after our line."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout)
    if stop_server and temporary_server_running():
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()  # atexit's stop is then a no-op


# ---------------------------------------------------------------------------------------------
#                          Interrupts, and the temporary Prefect server
# ---------------------------------------------------------------------------------------------


# Runs in the temporary server's interpreter in place of `-m uvicorn`: the server ends when the process that started
# it is gone (SIGKILLed, say) instead of serving no one and holding that process's stderr open. The parent's pid is
# polled, not a parent-death signal: that signal follows the thread that started the server (one of Prefect's
# service threads, perhaps), not the process.
SERVER_BOOTSTRAP = """\
import logging, os, runpy, signal, sys, threading, time
parent = {parent}
# a pooled connection whose rollback the shutdown cancels is logged as an error with a traceback; nothing is lost
logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown, then no more waiting
    time.sleep(5)
    os._exit(1)
if os.getppid() != parent:
    sys.exit(1)
threading.Thread(target=watch, name="aselect-parent-watch", daemon=True).start()
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _server_command(args: Any) -> Any:
    """Prefect's `python -m uvicorn ...` server command, run through SERVER_BOOTSTRAP (anything else unchanged)."""
    if isinstance(args, list) and args[1:3] == ["-m", "uvicorn"]:
        return [args[0], "-c", SERVER_BOOTSTRAP.format(parent=os.getpid()), *args[3:]]
    return args


class ServerWatch:
    """Shields the temporary Prefect server from Ctrl-C, fails the run fast when that server dies, and ends the
    server when the run is gone.

    Prefect starts its temporary server (no PREFECT_API_URL) as a child in our process group, so a Ctrl-C at the
    terminal killed it first and Prefect then retried its crash reports against it for minutes. Started in its own
    process group, it outlives our clean-up and is stopped last. A thread watches it: if it exits mid-run, the main
    thread is interrupted and the run ends with one line. The server watches us in turn (SERVER_BOOTSTRAP): a run
    killed outright does not leave it behind.
    """

    # Seconds the interrupted run has to unwind before it is ended: its Prefect calls retry against the dead server
    # (measured: still retrying an artifact update 4 s on), nothing can be reported anyway, and every stage's
    # on-disk state survives a kill at any point (tests/test_faults.py).
    GRACE = 3.0

    def __init__(self) -> None:
        self.died: int | None = None  # the server's exit code, when it died under us
        self._stop = threading.Event()

    def install(self) -> None:
        from prefect.server.api import server as prefect_server

        original = prefect_server.SubprocessASGIServer._run_uvicorn_command
        if getattr(original, "aselect_shielded", False):
            return

        # Prefect (3.9) has no public setting or hook for how it spawns its temporary server: the private
        # `_run_uvicorn_command` calls `subprocess.Popen` itself. So that method is wrapped, and Popen patched for
        # the call, to start the server in its own process group, watching our pid. Guarded by tests/test_faults.py:
        # test_ctrl_c_stops_the_run_in_seconds_and_a_rerun_resumes (Ctrl-C to our group spares the server until
        # it is stopped last; none outlives the run) and test_a_run_whose_temporary_server_dies_fails_fast_in_one_line,
        # and by tests/test_cli.py::test_the_temporary_server_ends_with_a_killed_run.
        popen = subprocess.Popen  # the patch below replaces it in the subprocess module itself

        def spawn(args: Any, *rest: Any, **kwargs: Any) -> subprocess.Popen[Any]:
            return popen(_server_command(args), *rest, process_group=0, **kwargs)

        def in_own_process_group(server: Any) -> Any:
            with mock.patch.object(prefect_server.subprocess, "Popen", spawn):
                return original(server)

        in_own_process_group.aselect_shielded = True  # type: ignore[attr-defined]
        prefect_server.SubprocessASGIServer._run_uvicorn_command = in_own_process_group
        threading.Thread(target=self._watch, name="aselect-server-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            if "prefect.server.api.server" not in sys.modules:
                continue
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
            process = server.server_process
            if server.running and process is not None and process.poll() is not None:
                if self._stop.is_set():  # we stopped it ourselves (stop() comes before any deliberate stop)
                    return
                self.died = process.returncode
                _thread.interrupt_main()
                if not self._stop.wait(self.GRACE):  # Prefect is retrying a dead server: do not limp on
                    self.report()
                    if os.getpgrp() == os.getpid():  # our own group only: dump and Dask workers die with us
                        os.killpg(os.getpgrp(), signal.SIGTERM)  # (ours raises in the main thread: harmless)
                    # A thread cannot end the process otherwise (sys.exit ends only this thread, and the main one is
                    # stuck in Prefect's retries): os._exit is Python's way. Guarded by tests/test_faults.py::
                    # test_a_run_whose_temporary_server_dies_fails_fast_in_one_line (exit 2, one line, in seconds).
                    os._exit(2)
                return

    def report(self) -> None:
        """The one-line error, on a line of its own: Prefect's "Error logging to API" lines can leave one unfinished."""
        print(f"\naselect: error: the temporary Prefect server exited mid-run (code {self.died}); finished "
              f"stages and chunks are kept, rerun to resume", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM as one KeyboardInterrupt: more of them while the run unwinds are ignored.

    A second Ctrl-C landing in the clean-up (Prefect reporting the crash, our flush) raised there instead, as a
    traceback and a death by SIGINT. The clean-up is bounded (ServerWatch.GRACE, the 3 s flush), so signals in the
    first REPEAT_IGNORED seconds after the first are dropped; a later one interrupts again, so nothing can hang.
    """

    REPEAT_IGNORED = 10.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.first: float | None = None  # when the first one arrived (time.monotonic)

    def __call__(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first < self.REPEAT_IGNORED:
            return
        self.first = now
        raise KeyboardInterrupt  # SIGTERM takes the same path as Ctrl-C

    def install(self, reset: bool = True) -> dict[int, Any]:
        """Handle both signals (main thread only; a caller's thread keeps its own); return the handlers replaced."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        if reset:
            self.first = None
        return {signum: signal.signal(signum, self) for signum in self.SIGNALS}

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


INTERRUPTS = Interrupts()


def _api_unreachable(exc: RuntimeError) -> str | None:
    """The one line for Prefect's "Failed to reach API" (a PREFECT_API_URL that stopped answering), else None."""
    if "Failed to reach API" not in str(exc):
        return None
    return (f"PREFECT_API_URL {os.environ.get('PREFECT_API_URL', '(from the Prefect profile)')}: Prefect failed to "
            f"reach its API; finished stages and chunks are kept, rerun to resume once it answers")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A server that was up before us (a caller's test harness) is not ours to stop.
    stop_server = not temporary_server_running()
    watch = ServerWatch()
    if stop_server and not os.environ.get("PREFECT_API_URL") and args.command in ("run", "bench"):
        watch.install()
    previous = INTERRUPTS.install()

    def wrap_up(timeout: float = 10.0) -> None:
        """Stand the watch down, then flush Prefect and stop our server: that exit is ours, not a death mid-run."""
        watch.stop()
        flush_prefect_services(stop_server, timeout)

    try:
        try:
            if args.command in ("run", "bench"):
                check_prefect_api()
            return args.func(args)
        except AselectError as exc:
            wrap_up()
            print(f"aselect: error: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            if "ephemeral Prefect API server" in str(exc):
                print(f"aselect: error: Prefect's temporary server did not answer within "
                      f"{os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']} s; raise "
                      f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or point PREFECT_API_URL at a running server "
                      f"(`make serve`)", file=sys.stderr)
                return 2
            line = _api_unreachable(exc) or io_failure(exc)
            if line is None:
                raise
            with contextlib.suppress(Exception):  # the API may be the thing that is down
                wrap_up(timeout=3.0)
            print(f"aselect: error: {line}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `aselect inspect | head`: the reader left; nothing more to say
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
            return 0
        except OSError as exc:
            line = io_failure(exc)
            if line is None:
                raise
            wrap_up()
            print(f"aselect: error: {line}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # in the run, or in the clean-up of an error above
        with contextlib.suppress(KeyboardInterrupt):  # one arriving past Interrupts.REPEAT_IGNORED
            wrap_up(timeout=3.0)
        if watch.died is not None:
            watch.report()
            return 2
        print("aselect: interrupted: rerun to resume (finished stages and chunks are kept)", file=sys.stderr)
        return 130
    finally:
        watch.stop()
        Interrupts.restore(previous)


def entry() -> None:
    """The `aselect` command: `main`, then an exit that skips the interpreter's module teardown.

    With torch, diffusers and Prefect loaded, that teardown (garbage collection while clearing ~10,000 modules)
    was measured at 2.6 s after every command, and it only frees memory the exit frees anyway. Everything else
    the interpreter does at exit still happens, in its order: threads joined, atexit handlers (Prefect drains its
    workers and stops its temporary server), streams flushed.

    Python has no public API for "the exit, without the module teardown": `threading._shutdown` (what Py_Finalize
    runs first: executors, non-daemon threads joined) and `atexit._run_exitfuncs` are CPython internals, used here
    where they exist (a Python without them gets the ordinary exit). Guarded by every `run_cli` test in
    tests/test_cli.py (`python -m aselect` is this entry: exit status, stdout's JSON complete, e.g.
    test_cli_run_json_and_inspect, test_cli_config_errors_are_one_line_without_traceback) and by
    tests/test_faults.py::test_ctrl_c_stops_the_run_in_seconds_and_a_rerun_resumes (exit 130, the temporary
    server stopped by Prefect's atexit handler)."""
    code = main()
    INTERRUPTS.install(reset=False)  # the exit work below takes a late Ctrl-C as the run did: ignored, not a traceback
    shutdown, run_exitfuncs = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(code)
    with contextlib.suppress(KeyboardInterrupt):  # one past Interrupts.REPEAT_IGNORED: the user insists on leaving
        shutdown()
        run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that left, or a closed stream: nothing to write to
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
