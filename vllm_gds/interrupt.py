"""Stopping cleanly: SIGINT/SIGTERM as an exception, a child process group that dies with its parent,
and partial output directories of dead processes removed.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal asked this process to stop. A BaseException, so that `except Exception` lets it pass."""

    def __init__(self, signum: int, what: str = ""):
        super().__init__(signum, what)
        self.signum = signum
        self.what = what

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def signals_raise():
    """Inside the block, SIGINT and SIGTERM raise Interrupted (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred():
    """Inside the block SIGINT and SIGTERM wait (blocked) until it ends: cleanup runs to completion."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def remove_tree(path: Path) -> None:
    with signals_deferred():
        shutil.rmtree(path, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """SIGTERM the child's process group (started with start_new_session=True), then SIGKILL; wait."""
    with signals_deferred():
        for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its group (vLLM's engine processes) may not be.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: Path, name: str) -> list[Path]:
    """Remove ``parent/.NAME.partial-PID`` directories whose PID no longer runs; return them."""
    removed = []
    for path in parent.glob(f".{name}.partial-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
