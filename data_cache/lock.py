"""Locks for writers of one cache directory.

Two kinds, both in the cache directory:

* **Writer locks** (``locks/*.json``): held for a whole command. ``lrm cache build`` takes ``build.json``, which
  excludes every other writer; ``lrm cache add-reward --reward R`` takes ``add-reward-R.json``, which excludes a
  build and another add-reward of R, but not add-rewards of other rewards (they write disjoint files and merge their
  manifest entries). A lock file names its holder (pid, host, since, command); a second writer gets a one-line
  ``CacheLockedError`` naming it. A lock whose pid is gone on this host (or now belongs to another process: the
  process start time is recorded too) is stale and taken over automatically; a lock from another host must be
  removed by hand once its holder is known to be gone.
* **The manifest mutex** (``.manifest.lock``, ``fcntl.flock``): held for the milliseconds of one read-modify-write
  of ``manifest.json`` (``storage.update_manifest``), so concurrent writers never lose each other's updates. The
  kernel releases it when its holder dies, so it is never stale.

Writer locks are re-entrant within one process (the CLI takes the lock before writing ``config.yaml``, the API call
inside it takes it again).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

from lrm.run import get_logger

log = get_logger("lrm.data_cache")

LOCK_DIR = "locks"
MUTEX = ".manifest.lock"
BUILD = "build"
ADD_REWARD = "add-reward"

_held: dict[str, int] = {}  # lock file path -> re-entry depth in this process
_held_guard = threading.Lock()
_thread_mutex = threading.RLock()  # flock is per open file: threads of one process need their own mutex too
_mutex_depth = threading.local()  # re-entry in one thread must not flock the file a second time (it would block)


def _error_cls():
    from data_cache.storage import CacheLockedError

    return CacheLockedError


# ---- holders -------------------------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The process start time (clock ticks since boot, /proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:  # a zombie has exited; its parent has not reaped it yet
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def holder_record(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _proc_start(os.getpid()),
            "since": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": command}


def is_stale(holder: dict[str, Any]) -> bool:
    """True when the holder is known to be gone: same host, and its pid is dead or belongs to a newer process."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if not _pid_alive(pid):
        return True
    start = holder.get("pid_start")
    return start is not None and _proc_start(pid) not in (None, start)


def describe_holder(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('command', '?')})")


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder written in a lock file; None when it vanished; {} when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def live_holders(root: Path) -> dict[str, dict[str, Any]]:
    """Lock file name -> holder, for every writer lock that is not stale (for ``verify``)."""
    out = {}
    d = Path(root) / LOCK_DIR
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        h = read_holder(p)
        if h and not is_stale(h):
            out[p.name] = h
    return out


# ---- the manifest mutex --------------------------------------------------------------------------------------
@contextlib.contextmanager
def manifest_mutex(root: str | Path) -> Iterator[None]:
    """Exclusive access to ``manifest.json`` for one read-modify-write (across processes and threads)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _thread_mutex:
        depth = _mutex_depth.__dict__.setdefault("by_root", {})
        key = str(root.absolute())
        held = depth.get(key, 0)
        depth[key] = held + 1
        try:
            try:
                import fcntl
            except ImportError:  # not POSIX: writer locks still exclude concurrent builds
                fcntl = None
            if held or fcntl is None:
                yield
                return
            fd = os.open(root / MUTEX, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            depth[key] = held


# ---- writer locks --------------------------------------------------------------------------------------------
def lock_name(kind: str, reward: str = "") -> str:
    if kind == BUILD:
        return "build.json"
    from data_cache.storage import safe_name

    return f"add-reward-{safe_name(reward)}.json"


def _conflicts(d: Path, kind: str, own: str) -> list[Path]:
    if kind == BUILD:  # a build excludes every other writer
        return sorted(p for p in d.glob("*.json"))
    return [p for p in (d / "build.json", d / own) if p.exists()]


def _fix(path: Path, holder: dict[str, Any]) -> str:
    if holder.get("host") == socket.gethostname():
        gone = "(it is removed automatically once that process has exited)"
    else:
        gone = f"(another host: if that process is gone, delete {path})"
    return f"wait for it to finish, or stop it {gone}"


@contextlib.contextmanager
def writer_lock(root: str | Path, kind: str, reward: str = "", command: str | None = None) -> Iterator[None]:
    """Hold the writer lock ``kind`` (``build`` or ``add-reward`` of ``reward``) of the cache in ``root``."""
    root = Path(root)
    d = root / LOCK_DIR
    name = lock_name(kind, reward)
    path = d / name
    key = str(path.absolute())
    with _held_guard:
        if key in _held:  # re-entry from this process
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    command = command or (f"lrm cache {kind}" + (f" --reward {reward}" if reward else ""))
    me = holder_record(command)
    with manifest_mutex(root):
        d.mkdir(parents=True, exist_ok=True)
        for p in _conflicts(d, kind, name):
            holder = read_holder(p)
            if holder is None:
                continue
            mine = holder.get("pid") == me["pid"] and holder.get("host") == me["host"]
            if mine and p.name != name:
                continue  # this process holds another kind (a build running add-reward, say)
            if holder and not mine and not is_stale(holder):
                what = "built" if p.name == "build.json" else f"scored by `{holder.get('command', 'add-reward')}`"
                raise _error_cls()(f"cache {root} is being {what} by {describe_holder(holder)}; "
                                   f"{_fix(p, holder)}")
            log.warning("removing stale lock %s (%s is gone)", p, describe_holder(holder) if holder else "unreadable")
            p.unlink(missing_ok=True)
        text = json.dumps(me, indent=2) + "\n"
        tmp = d / f".{name}.{me['pid']}.tmp"
        tmp.write_text(text)
        try:
            try:
                os.link(tmp, path)  # exclusive create with its content in place (no torn lock file)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: exclusive create, then write
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
        except FileExistsError:
            holder = read_holder(path) or {}
            raise _error_cls()(f"cache {root} is locked by {describe_holder(holder)}; {_fix(path, holder)}") \
                from None
        finally:
            tmp.unlink(missing_ok=True)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        with manifest_mutex(root):
            if (read_holder(path) or {}).get("pid") == me["pid"]:
                path.unlink(missing_ok=True)
