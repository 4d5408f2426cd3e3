"""Starting, watching and stopping the stack's processes, by the pid recorded at start.

Nothing here ever looks a process up by name: the machine is shared, and only what we
started (and wrote down) is ours to stop.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# Database servers refuse to run as root; when we are root they run as this user.
SERVICE_USER = "postgres"

# Processes this interpreter started and has not reaped yet (a test session, say):
# holding them keeps Popen from warning, and lets `alive` reap them when they exit.
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """Something the operator must fix; the message says what."""


def running_as_root() -> bool:
    return os.geteuid() == 0


def service_user() -> str | None:
    """The user PostgreSQL and PgBouncer run as (None: the current user)."""
    if not running_as_root():
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError as exc:
        raise StackError(
            f"running as root, but there is no {SERVICE_USER!r} user to run the database as"
        ) from exc
    return SERVICE_USER


def hand_to_service_user(*paths: Path) -> None:
    """Make `paths` belong to the service user (a no-op unless we are root)."""
    user = service_user()
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def run_as_service_user(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command to completion as the service user, raising with its output on failure."""
    user = service_user()
    result = subprocess.run(  # type: ignore[call-overload]
        list(args),
        user=user,
        group=user,
        extra_groups=[] if user else None,
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )
    if result.returncode != 0:
        raise StackError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return result  # type: ignore[no-any-return]


def spawn(
    args: Sequence[str],
    log: Path,
    pid_file: Path,
    *,
    env: Mapping[str, str] | None = None,
    as_service_user: bool = False,
    cwd: Path | None = None,
) -> int:
    """Start a long-running process detached from us, write its pid, return it."""
    user = service_user() if as_service_user else None
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            start_new_session=True,  # outlives `make up`; Ctrl-C in our terminal spares it
        )
    _children[proc.pid] = proc
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def alive(pid: int | None) -> bool:
    """True while `pid` runs (a zombie we have not reaped counts as gone)."""
    if pid is None:
        return False
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop(pid: int | None, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> bool:
    """Signal `pid` and wait for it to exit; SIGKILL after `timeout`. True if it was running."""
    if not alive(pid):
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if wait_until(lambda: not alive(pid), timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 5.0)
    return True


def stop_recorded(
    pid_file: Path, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0
) -> bool:
    """Stop the process whose pid `pid_file` holds, then remove the file."""
    stopped = stop(read_pid(pid_file), sig, timeout)
    pid_file.unlink(missing_ok=True)
    return stopped


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def ensure_port_free(port: int, variable: str, host: str = "127.0.0.1") -> None:
    """Raise a clear error, naming the variable that moves it, if `port` is taken."""
    with socket.socket() as sock:
        # Servers set SO_REUSEADDR too, so connections in TIME_WAIT do not block them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(
                f"port {port} on {host} is already in use; set {variable} to another port"
            ) from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports, below the ephemeral range.

    Ports the kernel hands out to outgoing connections (32768 and up on Linux) can be
    taken by a load generator's client sockets between choosing and binding them.
    """
    rng = random.Random()  # noqa: S311 (spreading ports, not secrets)
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        if all(_bindable(base + i, host) for i in range(count)):
            return base
    raise StackError(f"no {count} consecutive free ports between 20000 and 32000")


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status `url` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (our own URLs)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
