"""One writer per run: an exclusive lock on `<run>/run.lock`, held for as long as the process runs it.

The lock is a kernel `flock`, so it goes away with its process however that ends (kill -9 too): a
lock file left by a dead process is taken over without asking. The file names the holder (PID, host,
start time) for the message a second process gets. Within one process the lock is re-entrant (the
command line takes it before the flow, the flow takes it again).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from configs import UserError


class RunLocked(UserError):
    """Another live process holds the run."""


_HELD: dict[Path, list] = {}  # lock path -> [open file, depth]: this process's locks


@contextmanager
def hold_run_lock(path: Path, run_id: str):
    path = Path(path).resolve()
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            holder = json.loads(f.read())
            who = f"pid {holder['pid']} on {holder['host']} since {holder['started']}"
        except (ValueError, KeyError):
            who = "another process"
        f.close()
        raise RunLocked(f"run {run_id!r} is in use by {who} ({path}); wait for it to end or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
    f.flush()
    _HELD[path] = [f, 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if _HELD[path][1] == 0:
            del _HELD[path]
            f.close()  # releases the flock; the file stays, naming the last holder
