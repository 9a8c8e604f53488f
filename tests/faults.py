"""Crash injection for the crash-safety tests: run a module as ``__main__`` and SIGKILL it at the N-th step of
``hpc_rerun.atomic``'s writes (a temp file half written, a temp file complete, a file renamed into place).

    python -m tests.faults N hpc_rerun.cli merge-shards RUN_DIR

The product code has no hook for it: the steps are reached by wrapping the ``os`` functions atomic.py calls.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from types import SimpleNamespace

import hpc_rerun.atomic as atomic

_passed = 0


def fault_point(kill_at: int, label: str) -> None:
    global _passed
    _passed += 1
    if _passed == kill_at:
        os.write(2, f"fault injected at {label}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


class HalfThenRest:
    """A file whose every write goes out in two halves with a fault point between them."""

    def __init__(self, fh, kill_at: int):
        self._fh, self._kill_at = fh, kill_at

    def write(self, data: bytes) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        fault_point(self._kill_at, f"{self._fh.name}: half written")
        return self._fh.write(data[len(data) // 2:])

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def install(kill_at: int) -> None:
    """atomic.py sees an ``os`` whose fdopen and replace pass through fault points."""

    def replace(src, dst):
        fault_point(kill_at, f"{dst}: temp file complete")
        os.replace(src, dst)
        fault_point(kill_at, f"{dst}: renamed")

    wrapped = {name: getattr(os, name) for name in dir(os) if not name.startswith("__")}
    wrapped.update(fdopen=lambda fd, mode: HalfThenRest(os.fdopen(fd, mode), kill_at), replace=replace)
    atomic.os = SimpleNamespace(**wrapped)


if __name__ == "__main__":
    install(int(sys.argv[1]))
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
