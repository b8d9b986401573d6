"""Failpoints for crash tests: `ASELECT_FAILPOINT=<name>@<n>` SIGKILLs the run at the n-th hit of `<name>`.

Points, one per unit of work that a crash can interrupt (tests/test_faults.py kills the run at each):
`ingest` (each array written), `pretrain` (each training step, after its checkpoint), `chunk` (each
dump item, before and after its completion record), `pair` (each scored pair), `fit` (each probe fit),
`probe-epoch` (each attentive-probe epoch, after its checkpoint), and every stage's name just before its
manifest is marked complete.

Unset, which is always the case outside tests, a failpoint is one environment lookup. When the run is a
process-group leader (tests start it so), the whole group is killed, so dump and Dask worker processes
die with it as they would when the machine goes down. `ASELECT_FAILPOINT_LOG=<file>` appends every hit's
name to a file instead (how the tests count the hits of an uninterrupted run).
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Count a hit of `name`; SIGKILL the run when it is the configured one."""
    log = os.environ.get("ASELECT_FAILPOINT_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(name + "\n")
    spec = os.environ.get("ASELECT_FAILPOINT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
