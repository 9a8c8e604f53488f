"""Run model-written plotting code as untrusted code: own process, own folder, hard limits.

Layers (each one alone would not be enough):
- a fresh interpreter in a new session, killed with its whole process group at the time limit and
  again when it returns (no child left behind);
- resource limits: address space, file size, CPU seconds, open files, no core dumps;
- as root, it runs as ``nobody`` in a folder only it can write, and with a process-count limit; in a
  mount namespace of its own, where only this Python and its packages are made readable to nobody (so a
  clone in a private home, /root being 0700, works; the rest of such a home stays hidden);
- no network: a private network namespace where the machine allows one (``unshare``);
- inside, an audit hook refuses sockets, new processes and writes outside its folder.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TIME_LIMIT_S = 15
MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 32 * 1024**2
NOBODY_UID = NOBODY_GID = 65534


@dataclass
class PlotRun:
    ok: bool  # ran to the end without an exception, inside the limits
    y_values: list[float] | None  # what the figures show, every axes (None if it did not run)
    error: str | None = None
    by_chart: dict[str, list[float]] | None = None  # the current axes read per chart type (LineChart, ...)


@functools.lru_cache(maxsize=2)
def _isolation(as_root: bool) -> list[str]:
    """The prefix that gives a private network (and, as root, mount) namespace here, or [] where none is
    allowed."""
    unshare = shutil.which("unshare")
    if not unshare:
        return []
    candidates = ([unshare, "--net", "--mount"],) if as_root else ([unshare, "--net"],
                                                                    [unshare, "--user", "--map-root-user", "--net"])
    for prefix in candidates:
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def _limit_child() -> None:
    """preexec_fn: runs in the child between fork and exec; the limits pass on to what it execs."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (TIME_LIMIT_S + 5, TIME_LIMIT_S + 5))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # enforced once it runs as nobody


@functools.lru_cache(maxsize=1)
def check_sandbox() -> None:
    """Fail loudly, once, if the sandbox itself cannot run here (so no answer is scored ECR=False for
    a reason that is ours, not the model's)."""
    probe = run_plot_code("import matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()", None, "probe", TIME_LIMIT_S,
                          checked=True)
    if not probe.ok:
        raise RuntimeError(f"the plotting sandbox cannot run here ({probe.error}); it needs matplotlib, pandas "
                           "and openpyxl, and as root util-linux's unshare and mount")


def run_plot_code(code: str, xlsx: Path | None, file_name: str, time_limit_s: float = TIME_LIMIT_S,
                  checked: bool = False) -> PlotRun:
    """Run ``code`` in a sandbox beside a copy of the table (as table.xlsx and <file_name>.xlsx)."""
    if not checked:
        check_sandbox()
    with tempfile.TemporaryDirectory(prefix="hpc-rerun-plot-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        if xlsx is not None:
            for name in ("table.xlsx", f"{file_name}.xlsx"):
                shutil.copyfile(xlsx, work / name)
        (work / "solution.py").write_text(code)
        result_path = Path(tmp) / "result.json"
        result_path.write_text("")
        as_root = os.geteuid() == 0
        if as_root:
            for path in (work, *work.iterdir(), result_path):
                os.chown(path, NOBODY_UID, NOBODY_GID)
            os.chmod(tmp, 0o711)
        harness = Path(__file__).with_name("_plot_harness.py")
        isolation = _isolation(as_root)
        command = [*isolation, sys.executable, "-I", str(harness), str(work), str(result_path)]
        if as_root and isolation:  # the harness exposes this Python in its mount namespace, then becomes nobody
            command += [str(NOBODY_UID), str(NOBODY_GID)]
        elif as_root:  # no namespaces here: nobody must be able to read this Python where it is
            setpriv = shutil.which("setpriv")
            if not setpriv:
                raise RuntimeError("setpriv (util-linux) is needed to run plotting code as nobody; install util-linux")
            command = [setpriv, f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups", *command]
        env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "HOME": str(work), "MPLCONFIGDIR": str(work),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_limit_child,
        )
        try:
            _, stderr = proc.communicate(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return PlotRun(False, None, f"time limit of {time_limit_s:g} s exceeded")
        finally:
            _kill_group(proc.pid)  # whatever it started is gone too
        try:
            result = json.loads(result_path.read_text() or "{}")
        except json.JSONDecodeError:
            result = {}
        if proc.returncode != 0 or not result:
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            return PlotRun(False, None, result.get("error") or tail[0])
        ok = bool(result["ok"])
        return PlotRun(ok, result.get("y") if ok else None, result.get("error"), result.get("by_chart") if ok else None)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
