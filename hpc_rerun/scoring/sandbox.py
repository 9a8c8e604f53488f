"""Run model-written plotting code as hostile code: confined by the kernel, bounded per run, read strictly.

One warm fork server per scoring process (``_harness.py``, started lazily, restarted if it dies) has
imported pandas and matplotlib once; each run is a child of it with namespaces, a tmpfs and limits of its
own (see the harness's docstring for the process tree). Layers, strongest first; the strongest that
exists here runs, a weaker one is named once in a warning, and every run reports its layer:

- ``bubblewrap``: user, PID, mount, network, IPC and UTS namespaces (bwrap: --die-with-parent,
  --new-session); it sees read-only only this Python and its packages (prefixes, site-packages and
  where their links lead), the system libraries (/usr) and the one table; /sandbox/work, /tmp, /var/tmp and
  /dev/shm are one private tmpfs capped in size and files; its own /proc; no network, no host sockets.
  Each run has its own mount, PID, network and IPC namespaces besides, runs as nobody in a user
  namespace of its own with no capabilities, and the kernel removes all it started when it ends.
  Bounds per run: the keeper's watch of the run's own /proc (all its processes' memory and tasks
  together, every 20 ms) on top of per-process rlimits, and, where the checker may make one (as root:
  cgroup v2, or v1's memory and pids hierarchies), a cgroup per run as the kernel's hard stop.
- ``process``: no namespaces (bubblewrap or unprivileged user namespaces missing): a fork of the same
  server in a session of its own, rlimits, a folder of its own, nobody when started as root; it can
  read what that user can read, and a daemon it starts can outlive it.

The result travels on a pipe this side owns: the run's one JSON line, then the keeper's status line
(written after the run's PID namespace is gone). The reference never enters the sandbox, so forging a
Pass is as hard as plotting the right chart. Any failure of a run, the keeper or the reading is a
``PlotRun`` with ``ok`` false and the reason; only a sandbox that cannot start at all raises.
"""

from __future__ import annotations

import array
import atexit
import json
import logging
import os
import re
import select
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TIME_LIMIT_S = 15  # as the benchmark
MEMORY_LIMIT_BYTES = 2 * 1024**3  # all processes of one run together
CGROUP_MEMORY_BYTES = MEMORY_LIMIT_BYTES + 512 * 1024**2  # the kernel's hard stop, above the keeper's watch
ADDRESS_SPACE_BYTES = 4 * 1024**3  # per process (the warm interpreter alone maps about 1 GiB)
PROCESS_LIMIT = 32  # processes and threads of one run together
FILE_SIZE_LIMIT_BYTES = 32 * 1024**2
DISK_LIMIT_BYTES = 256 * 1024**2  # the work folder, /tmp, /var/tmp and /dev/shm together
FILE_COUNT_LIMIT = 8192
RESULT_LIMIT_BYTES = 8 * 1024**2  # the run's line on the result pipe
STDERR_LIMIT_BYTES = 64 * 1024  # what of its stderr the checker keeps (the rest is read and dropped)
ANSWER_GRACE_S = 10  # past the time limit, how long the keeper may take before the run counts as lost
START_TIMEOUT_S = 120
NOBODY_UID = 65534
HARNESS = Path(__file__).with_name("_harness.py")
CHARTS = Path(__file__).with_name("charts.py")
LOST = "sandbox: the run did not end in time (the sandbox is restarted)"
SAFE_FILE_NAME = re.compile(r"[\w][\w.\- ()]{0,200}")


@dataclass(frozen=True)
class PlotRun:
    ok: bool  # ran to the end without an exception, inside the limits, and its reading is well-formed
    reading: dict | None  # the chart as charts.read_chart reads it (None if it did not run)
    error: str | None = None  # why not, when not
    layer: str | None = None  # the sandbox layer it ran under


class SandboxUnavailable(RuntimeError):
    """The sandbox itself cannot run here: an error of the installation, not a score of the answer."""


# What the sandbox may see -------------------------------------------------------------------------------------

def python_paths() -> list[str]:
    """This Python and its packages: the prefixes, the site-packages in use, and where links in those folders
    lead (a clone's venv may link to packages elsewhere). Not sys.path: it may hold a project folder."""
    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        roots.append(site.getusersitepackages())
    roots = [r for r in roots if os.path.isdir(r)]
    found = {os.path.realpath(r) for r in roots}
    for root in roots:
        with os.scandir(root) as entries:
            found |= {os.path.realpath(e.path) for e in entries if e.is_symlink() and os.path.exists(e.path)}
    found |= {os.path.realpath(os.path.dirname(sys.executable))}
    return outermost(found)


def outermost(paths: set[str]) -> list[str]:
    """The paths none of the others contains (a bind of those covers the rest)."""
    ordered = sorted(paths)
    kept: list[str] = []
    for path in ordered:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # each run's own tmpfs is mounted over these (and its /sandbox/work)


def bwrap_command(bwrap: str, control_fd: int) -> tuple[list[str], list[list[str]]]:
    """The command that starts the fork server, and the Python folders that lie under a folder each run gets
    privately (a venv in /tmp): the server sees them at a second place too, for each run to bind them back."""
    command = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-add", "ALL",
               "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
                "--tmpfs", "/tmp", "--dir", "/var/tmp"]
    paths = python_paths()
    executable = os.path.abspath(sys.executable)  # as named: a venv's bin/python is a link into its base
    if not any(executable.startswith(p.rstrip("/") + "/") for p in paths):
        paths.append(executable)
    rebind = []
    for path in paths:
        source = os.path.realpath(path)
        command += ["--ro-bind", source, path]
        if any(path == d or path.startswith(d + "/") for d in PRIVATE_DIRS):
            kept = f"/sandbox/python/{len(rebind)}"
            command += ["--ro-bind", source, kept]
            rebind.append([kept, path])
    command += ["--ro-bind", str(HARNESS), "/sandbox/harness/_harness.py",
                "--ro-bind", str(CHARTS), "/sandbox/harness/charts.py",
                "--dir", "/sandbox/work", "--dir", "/sandbox/run", "--chdir", "/", "--remount-ro", "/"]
    return [*command, "--", executable, "-I", "/sandbox/harness/_harness.py", "bubblewrap", str(control_fd)], rebind


# Per-run cgroups ----------------------------------------------------------------------------------------------

@dataclass
class CgroupTree:
    """Where per-run cgroups can be made, under this process's own cgroup: v2 (one folder per run, where this
    process sits in the root cgroup, as in a container with its own cgroup namespace) or v1's memory and pids
    hierarchies (each run a folder in both). Made as root only."""
    version: int
    parents: dict[str, Path]  # controller ("memory", "pids", or "unified" for v2) -> this process's folder

    @classmethod
    def find(cls) -> CgroupTree | None:
        if os.geteuid() != 0:
            return None  # a delegated v2 subtree would need this process moved to a leaf first: not done
        root = Path("/sys/fs/cgroup")
        own = {}
        try:
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                for controller in controllers.split(",") if controllers else ["unified"]:
                    own[controller] = path
            if (root / "cgroup.controllers").exists():
                if own.get("unified") != "/" or not {"memory", "pids"} <= set(
                        (root / "cgroup.controllers").read_text().split()):
                    return None
                (root / "cgroup.subtree_control").write_text("+memory +pids")
                tree = cls(2, {"unified": root / f"hpc-rerun-{os.getpid()}"})
            elif all(c in own and (root / c / "cgroup.procs").exists() for c in ("memory", "pids")):
                tree = cls(1, {c: root / c / own[c].lstrip("/") / f"hpc-rerun-{os.getpid()}"
                               for c in ("memory", "pids")})
            else:
                return None
            for parent in tree.parents.values():
                remove_stale(parent.parent)
                parent.mkdir(exist_ok=True)
                if tree.version == 2:
                    (parent / "cgroup.subtree_control").write_text("+memory +pids")
            return tree
        except (OSError, ValueError) as err:
            log.info("no per-run cgroups here (%s)", err)
            return None

    def limits(self) -> dict[str, dict[str, str]]:
        if self.version == 2:
            return {"unified": {"memory.max": str(CGROUP_MEMORY_BYTES), "memory.swap.max": "0",
                                "pids.max": str(PROCESS_LIMIT + 1)}}
        return {"memory": {"memory.limit_in_bytes": str(CGROUP_MEMORY_BYTES)},
                "pids": {"pids.max": str(PROCESS_LIMIT + 1)}}

    def make(self, run: str) -> list[Path]:
        folders = []
        try:
            for controller, settings in self.limits().items():
                folder = self.parents[controller] / run
                folder.mkdir()
                folders.append(folder)
                for name, value in settings.items():
                    (folder / name).write_text(value)
        except OSError:
            self.remove(folders)
            raise
        return folders

    def out_of_memory(self, folders: list[Path]) -> bool:
        for folder in folders:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    fields = dict(line.split() for line in (folder / name).read_text().splitlines())
                except (OSError, ValueError):
                    continue
                if int(fields.get("oom_kill", 0)):
                    return True
        return False

    def close(self) -> None:
        for parent in self.parents.values():
            self.remove([*parent.glob("run-*"), parent])

    @staticmethod
    def remove(folders: list[Path]) -> None:
        for folder in folders:
            for _ in range(50):  # a run's last process may take a moment to leave it
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def remove_tree(path: Path) -> None:
    """rm -rf, which any depth of folders the code made cannot make fail (shutil.rmtree recurses in Python)."""
    try:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], env={"PATH": "/usr/bin:/bin"},
                       capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not remove %s: %s", path, err)


def remove_stale(folder: Path) -> None:
    """The cgroups a scoring process that is gone left behind (killed before it could remove them)."""
    for stale in folder.glob("hpc-rerun-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            CgroupTree.remove([*stale.glob("run-*"), stale])


# The fork server ----------------------------------------------------------------------------------------------

class Zygote:
    """One started harness: its process and the control socket requests go through."""

    def __init__(self, layer: str):
        self.layer = layer
        self.lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.cgroups: CgroupTree | None = None
        self.work_root = Path(tempfile.mkdtemp(prefix="hpc-rerun-plot-")) if layer == "process" else None
        if self.work_root is not None:
            self.work_root.chmod(0o711)
        env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "HOME": "/tmp", "LANG": "C.UTF-8",
               "MPLCONFIGDIR": "/tmp/matplotlib", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        self.rebind: list[list[str]] = []
        if layer == "bubblewrap":
            command, self.rebind = bwrap_command(shutil.which("bwrap"), theirs.fileno())
        else:
            config = self.work_root / "matplotlib"
            config.mkdir()
            env.update(HOME=str(config), MPLCONFIGDIR=str(config))
            command = [sys.executable, "-I", str(HARNESS), "process", str(theirs.fileno())]
        self.log = tempfile.TemporaryFile()  # its own stderr (the runs have theirs): read only if it fails to start
        try:
            self.process = subprocess.Popen(command, env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        except OSError as err:
            ours.close()
            self.log.close()
            if self.work_root is not None:
                remove_tree(self.work_root)
            raise SandboxUnavailable(f"the {layer} sandbox did not start: {err}") from None
        finally:
            theirs.close()
        self.control = ours
        self.control.settimeout(START_TIMEOUT_S)
        try:
            hello = json.loads(self.control.recv(4096) or b"{}")
        except (OSError, ValueError):
            hello = {}
        if hello.get("ready") != layer:
            self.process.kill()
            self.process.wait()
            self.log.seek(0)
            said = self.log.read(8000).decode(errors="replace").strip().splitlines()
            self.close()
            raise SandboxUnavailable(f"the {layer} sandbox did not start: {said[-1] if said else 'no reason given'}")
        self.control.settimeout(10)
        self.cgroups = CgroupTree.find() if layer == "bubblewrap" else None
        self.runs = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        try:
            self.control.close()
        finally:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
            if self.work_root is not None:
                remove_tree(self.work_root)
            if self.cgroups is not None:
                self.cgroups.close()
            self.log.close()

    def run(self, code: str, xlsx: Path | None, file_name: str, time_limit_s: float) -> PlotRun:
        with self.lock:
            self.runs += 1
            number = self.runs
        opened: list[int] = []
        cgroup_folders: list[Path] = []
        work = None
        try:
            result_r, result_w = os.pipe()
            opened += [result_r, result_w]
            stderr_r, stderr_w = os.pipe()
            opened += [stderr_r, stderr_w]
            code_fd = os.memfd_create("solution.py", os.MFD_CLOEXEC)
            opened.append(code_fd)
            os.write(code_fd, code.encode("utf-8", errors="surrogatepass"))
            os.lseek(code_fd, 0, os.SEEK_SET)
            fds, names = [result_w, stderr_w, code_fd], ["result", "stderr", "code"]
            if xlsx is not None:
                table_fd = os.open(xlsx, os.O_RDONLY | os.O_CLOEXEC)
                opened.append(table_fd)
                fds.append(table_fd)
                names.append("table")
            if self.cgroups is not None:
                cgroup_folders = self.cgroups.make(f"run-{number}")
                for folder in cgroup_folders:
                    fd = os.open(folder / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                    opened.append(fd)
                    fds.append(fd)
                    names.append("cgroup")
            request = {"fds": names, "time_limit_s": time_limit_s, "memory_bytes": MEMORY_LIMIT_BYTES,
                       "address_space_bytes": ADDRESS_SPACE_BYTES, "processes": PROCESS_LIMIT,
                       "file_size_bytes": FILE_SIZE_LIMIT_BYTES, "disk_bytes": DISK_LIMIT_BYTES,
                       "files": FILE_COUNT_LIMIT, "rebind": self.rebind,
                       "file_name": file_name if SAFE_FILE_NAME.fullmatch(file_name or "") else None}
            if self.layer == "process":
                work = Path(tempfile.mkdtemp(prefix=f"run-{number}-", dir=self.work_root))
                if os.geteuid() == 0:
                    os.chown(work, NOBODY_UID, NOBODY_UID)
                request["work"] = str(work)
            with self.lock:
                self.control.sendmsg([json.dumps(request).encode()],
                                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            for fd in fds:  # the server has its copies: ours would keep the pipes open
                os.close(fd)
                opened.remove(fd)
            result, stderr = read_run(result_r, stderr_r, time_limit_s + ANSWER_GRACE_S)
            out_of_memory = self.cgroups is not None and self.cgroups.out_of_memory(cgroup_folders)
            return judge(result, stderr, time_limit_s, out_of_memory, self.layer)
        except OSError as err:
            return PlotRun(False, None, f"sandbox: {type(err).__name__}: {err}", self.layer)
        finally:
            for fd in opened:
                os.close(fd)
            if cgroup_folders:
                CgroupTree.remove(cgroup_folders)
            if work is not None:
                remove_tree(work)


def read_run(result_r: int, stderr_r: int, deadline_s: float) -> tuple[bytes | None, bytes]:
    """The result pipe up to its end (None if it overflowed or did not end in time) and the head of stderr;
    both read with caps, neither waited on past the deadline."""
    deadline = time.monotonic() + deadline_s
    result, stderr = bytearray(), bytearray()
    overflow = False
    open_fds = {result_r, stderr_r}
    while result_r in open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, bytes(stderr)
        readable, _, _ = select.select(list(open_fds), [], [], left)
        for fd in readable:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
            elif fd == result_r:
                if len(result) + len(chunk) > RESULT_LIMIT_BYTES:
                    overflow = True
                    result = result[-4096:]  # the keeper's status comes last
                result += chunk
            elif len(stderr) < STDERR_LIMIT_BYTES:
                stderr += chunk[: STDERR_LIMIT_BYTES - len(stderr)]
    drain_until = time.monotonic() + 0.2  # what the run wrote last; its writers are gone with it
    while stderr_r in open_fds and len(stderr) < STDERR_LIMIT_BYTES and select.select(
            [stderr_r], [], [], max(0, drain_until - time.monotonic()))[0]:
        chunk = os.read(stderr_r, STDERR_LIMIT_BYTES - len(stderr))
        if not chunk:
            break
        stderr += chunk
    if overflow:
        status = bytes(result).rsplit(b"\n", 2)[-2:]
        return b"\x00overflow\n" + b"\n".join(status), bytes(stderr)
    return bytes(result), bytes(stderr)


def judge(result: bytes | None, stderr: bytes, time_limit_s: float, out_of_memory: bool, layer: str) -> PlotRun:
    """The run's outcome from what came back: the keeper's status (last line), the run's one line before it."""
    def failed(reason: str) -> PlotRun:
        return PlotRun(False, None, reason, layer)

    if result is None:
        return failed(LOST)
    lines = [line for line in result.split(b"\n") if line.strip()]
    try:
        status = json.loads(lines[-1]) if lines else None
    except ValueError:
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        return failed("sandbox: the run ended without the keeper's status")
    reason = status.get("reason")
    if reason in ("memory", "processes") or out_of_memory:  # before time: the kernel's kill may leave it waiting
        return failed(f"the run's {'processes' if reason == 'processes' else 'memory'} limit was exceeded")
    if reason == "time":
        return failed(f"time limit of {time_limit_s:g} s exceeded")
    if status["status"] == "keeper failed":
        return failed(f"sandbox: {str(reason)[:300]}")
    payload = lines[:-1]
    if payload[:1] == [b"\x00overflow"]:
        return failed(f"the result was larger than {RESULT_LIMIT_BYTES} bytes")
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:]
    if len(payload) != 1:
        how = f"killed by signal {status.get('signal')}" if status["status"] == "killed" else \
            f"exit code {status.get('code')}"
        return failed(tail[0] if not payload and tail else f"no single result line ({how})")
    try:
        outcome = json.loads(payload[0])
    except (ValueError, RecursionError) as err:
        return failed(f"malformed result: {str(err)[:200]}")
    problem = invalid_outcome(outcome)
    if problem:
        return failed(f"malformed result: {problem}")
    if not outcome["ok"]:
        return failed(outcome["error"])
    return PlotRun(True, outcome["reading"], None, layer)


def invalid_outcome(outcome) -> str | None:
    """Why ``outcome`` is not {"ok": true, "reading": READING} or {"ok": false, "error": str}, if it is not.
    READING is charts.read_chart's object; here it must be an object of text, numbers, null, lists and
    objects, at most four levels deep (the comparison reads it defensively: metrics.py)."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("ok"), bool):
        return "not an object with a boolean 'ok'"
    if not outcome["ok"]:
        if set(outcome) != {"ok", "error"} or not isinstance(outcome["error"], str):
            return "a failure without a text 'error'"
        return None
    if set(outcome) != {"ok", "reading"} or not isinstance(outcome["reading"], dict):
        return "a success without a reading object"
    pending = [(outcome["reading"], 1)]
    while pending:
        value, depth = pending.pop()
        if depth > 4:
            return "a reading nested deeper than four levels"
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                return "a reading with keys that are not text"
            pending += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            pending += [(v, depth + 1) for v in value]
        elif value is not None and type(value) not in (str, int, float):
            return f"a reading holding {type(value).__name__}"
    return None


# One sandbox per process --------------------------------------------------------------------------------------

class Sandbox:
    """The process's fork server, started on first use in the strongest layer that exists here."""

    def __init__(self):
        self.lock = threading.Lock()
        self.zygote: Zygote | None = None
        self.warned = False

    def layers(self) -> list[str]:
        return (["bubblewrap"] if shutil.which("bwrap") else []) + ["process"]

    def get(self) -> Zygote:
        with self.lock:
            if self.zygote is not None and self.zygote.alive():
                return self.zygote
            if self.zygote is not None:
                self.zygote.close()
                self.zygote = None
            problems = []
            if not shutil.which("bwrap"):
                problems.append("bubblewrap (bwrap) is not installed")
            for layer in self.layers():
                try:
                    self.zygote = Zygote(layer)
                except (OSError, SandboxUnavailable) as err:
                    problems.append(str(err))
                    continue
                if problems and not self.warned:
                    self.warned = True
                    log.warning("plotting code runs in the weaker '%s' sandbox layer (%s); see the README's "
                                "sandbox layers", layer, "; ".join(problems))
                return self.zygote
            raise SandboxUnavailable("the plotting sandbox cannot run here (" + "; ".join(problems) + "); it needs "
                                     "matplotlib, pandas and openpyxl, and bubblewrap for the strongest layer")

    def lost(self, zygote: Zygote) -> None:
        with self.lock:
            if self.zygote is zygote:
                self.zygote = None
        zygote.close()

    def close(self) -> None:
        with self.lock:
            if self.zygote is not None:
                self.zygote.close()
                self.zygote = None


SANDBOX = Sandbox()
atexit.register(SANDBOX.close)


def run_plot_code(code: str, xlsx: Path | None, file_name: str, time_limit_s: float = TIME_LIMIT_S) -> PlotRun:
    """Run ``code`` in the sandbox beside the table (as table.xlsx and <file_name>.xlsx); never raises for
    anything the code does, only when the sandbox cannot start at all (SandboxUnavailable)."""
    zygote = SANDBOX.get()
    run = zygote.run(code, xlsx, file_name, time_limit_s)
    if run.error == LOST or not zygote.alive():
        SANDBOX.lost(zygote)
    return run
