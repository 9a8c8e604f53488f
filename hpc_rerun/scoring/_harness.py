"""Inside the sandbox: a fork server that imports pandas and matplotlib once, then runs each answer's code
in a child of its own. Started by ``sandbox.py``; not imported by anything else.

Usage: python -I _harness.py LAYER CONTROL_FD. LAYER is "bubblewrap" (this process runs in bubblewrap's
user, PID, mount, network, IPC and UTS namespaces, with capabilities inside them only) or "process" (no
namespaces: the weakest layer). Each request on CONTROL_FD (a SOCK_SEQPACKET socket) is one JSON message
with its file descriptors: the result pipe, the stderr pipe, the code, and optionally the table and the
cgroup files to join. Per request:

  zygote --fork--> keeper: new mount, PID, network and IPC namespaces; a size-capped tmpfs mounted as
                   /sandbox/work, /tmp, /var/tmp and /dev/shm; watches the run (time, processes, memory), kills it,
                   then writes the run's status as the last line of the result pipe
         keeper --fork--> runner, PID 1 of the new PID namespace: its own /proc, the table written to
                   /sandbox/work, rlimits, the cgroups joined, a user namespace of its own where it is nobody with
                   no capabilities (no_new_privs), then the code; the chart's reading is one JSON line
                   on the result pipe. When it ends the kernel kills everything else in its PID namespace.
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import time

LAYER, CONTROL_FD = sys.argv[1], int(sys.argv[2])
WORK = "/sandbox/work"
PRIVATE_DIRS = {"work": WORK, "tmp": "/tmp", "var_tmp": "/var/tmp", "shm": "/dev/shm"}
RUN_ROOT = "/sandbox/run"  # the per-run tmpfs is mounted here, then its folders bound where they are seen
NOBODY = 65534
MAX_FDS = 8
WATCH_S = 0.02  # how often the keeper looks at the run's memory and tasks

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
CLONE_NEWNET, CLONE_NEWIPC = 0x40000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 0x1000, 0x4000, 0x40000, 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, LINUX_CAPABILITY_VERSION_3 = 38, 24, 0x20080522
libc = ctypes.CDLL(None, use_errno=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import charts  # noqa: E402  (this folder's charts.py, by path: no hpc_rerun package in here)

charts.prepare_matplotlib()
import matplotlib.pyplot as plt  # noqa: E402
import openpyxl  # noqa: E402,F401  (what pd.read_excel needs, imported once here rather than per run)
import pandas  # noqa: E402,F401


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), f"mount {target}")


class Limits:
    """What one run may use, sent by the checker with each request."""

    def __init__(self, spec: dict):
        self.time_s = float(spec["time_limit_s"])
        self.memory = int(spec["memory_bytes"])  # all processes of the run together (RSS)
        self.address_space = int(spec["address_space_bytes"])  # per process
        self.processes = int(spec["processes"])  # processes and threads of the run together
        self.file_size = int(spec["file_size_bytes"])
        self.disk = int(spec["disk_bytes"])  # the run's tmpfs: its work folder, /tmp, /var/tmp, /dev/shm together
        self.files = int(spec["files"])  # inodes on that tmpfs


# The keeper ---------------------------------------------------------------------------------------------------

def private_filesystem(limits: Limits, rebind: list[list[str]]) -> None:
    """One tmpfs for the run, size- and inode-capped, seen as its work folder, /tmp, /var/tmp and /dev/shm;
    then the Python folders those cover (``rebind``: where the server also sees them, where they belong)."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", RUN_ROOT, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={limits.disk},nr_inodes={limits.files},mode=0755")
    for name, target in PRIVATE_DIRS.items():
        folder = os.path.join(RUN_ROOT, name)
        os.mkdir(folder, 0o1777 if name != "work" else 0o755)
        os.chmod(folder, 0o1777 if name != "work" else 0o755)
        os.makedirs(target, exist_ok=True)
        mount(folder, target, None, MS_BIND | MS_REC)
    check(libc.umount2(RUN_ROOT.encode(), MNT_DETACH), f"umount {RUN_ROOT}")  # seen only where it is bound
    for kept, path in rebind:
        os.makedirs(path, exist_ok=True)
        mount(kept, path, None, MS_BIND | MS_REC)
        mount("none", path, None, MS_BIND | MS_REC | MS_REMOUNT | MS_RDONLY)


def run_usage() -> tuple[int, int]:
    """(tasks, bytes) of the run, read from its own /proc: every process's threads and resident memory, plus the
    memory no process's RSS shows: memfd files it holds open and System V shared memory in its IPC namespace
    (the keeper's own, shared with the run)."""
    tasks = resident = 0
    memfds: dict[tuple[int, int], int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as fh:
                status = fh.read(4096)
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith("/memfd:"):
                    held = os.stat(f"/proc/{entry}/fd/{fd}")
                    memfds[held.st_dev, held.st_ino] = held.st_blocks * 512
        except OSError:
            continue
        for line in status.split(b"\n"):
            if line.startswith(b"Threads:"):
                tasks += int(line.split()[1])
            elif line.startswith(b"VmRSS:"):
                resident += int(line.split()[1]) * 1024
    try:
        with open("/proc/sysvipc/shm") as fh:
            header, *segments = fh.read().splitlines()
        column = header.split().index("rss")
        resident += sum(int(segment.split()[column]) for segment in segments)
    except (OSError, ValueError):
        pass
    return tasks, resident + sum(memfds.values())


def keep(request: dict, fds: dict[str, int]) -> None:
    """The keeper: isolate, start the runner, watch it, end it, report."""
    limits = Limits(request)
    result_fd = fds["result"]
    status = {"status": "exited", "reason": None}
    runner = None
    try:
        if LAYER == "bubblewrap":
            check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
            private_filesystem(limits, request["rebind"])
        ready_r, ready_w = os.pipe()
        started = time.monotonic()
        runner = os.fork()
        if runner == 0:
            os.close(ready_r)
            try:
                run(request, fds, limits, ready_w)
            finally:
                os._exit(70)
        os.close(ready_w)
        for fd in others(fds):
            os.close(fd)
        ended = os.pidfd_open(runner)
        deadline = started + limits.time_s
        listening, watching = True, False  # watching from the runner's word that /proc is its own (not the zygote's)
        while True:
            left = deadline - time.monotonic()
            waiting = [ended, ready_r] if listening else [ended]
            readable = select.select(waiting, [], [], max(0.0, min(left, WATCH_S)))[0] if left > 0 else []
            if ended in readable:
                _, wait_status = os.waitpid(runner, 0)
                break
            if ready_r in readable:
                listening = False
                watching = os.read(ready_r, 1) == b"1" and LAYER == "bubblewrap"
            reason = None
            if time.monotonic() >= deadline:
                reason = "time"
            elif watching:
                tasks, resident = run_usage()
                reason = "processes" if tasks > limits.processes else "memory" if resident > limits.memory else None
            if reason:
                status["reason"] = reason
                end(runner)
                _, wait_status = os.waitpid(runner, 0)
                break
        if LAYER == "process":
            kill_group(runner)
        if os.WIFSIGNALED(wait_status):
            status.update(status="killed", signal=os.WTERMSIG(wait_status))
        else:
            status.update(code=os.WEXITSTATUS(wait_status))
    except BaseException as err:  # the keeper's own failure is reported, never left unsaid
        status = {"status": "keeper failed", "reason": f"{type(err).__name__}: {err}"[:300]}
        if runner:
            end(runner)
    write_all(result_fd, b"\n" + json.dumps(status).encode() + b"\n")


def others(fds: dict) -> list[int]:
    """Every descriptor of a request but the result pipe (the keeper's own to write last)."""
    return [fd for name, fd in fds.items() if name not in ("result", "cgroups")] + fds["cgroups"]


def end(runner: int) -> None:
    """Kill the run: its PID 1, whose end makes the kernel kill all else in its namespace (in the process
    layer, its process group instead)."""
    try:
        os.kill(runner, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if LAYER == "process":
        kill_group(runner)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass


# The runner ---------------------------------------------------------------------------------------------------

def become_nobody() -> None:
    """A user namespace of the run's own where it is nobody, with no capabilities and no way to gain any:
    the mounts it was given are locked, and nothing of the zygote's namespaces can be changed."""
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER), "unshare user")
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{NOBODY} {uid} 1"),
                       ("/proc/self/gid_map", f"{NOBODY} {gid} 1")):
        with open(path, "w") as fh:
            fh.write(text)
    drop_capabilities()


def drop_capabilities() -> None:
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(limits: Limits) -> None:
    cpu = int(limits.time_s) + 5
    for which, value in ((resource.RLIMIT_AS, limits.address_space), (resource.RLIMIT_FSIZE, limits.file_size),
                         (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, limits.processes)):
        resource.setrlimit(which, (value, value))


def write_table(fd: int, names: list[str]) -> None:
    data = b""
    while chunk := os.read(fd, 1 << 20):
        data += chunk
    for name in names:
        with open(os.path.join(WORK, name), "wb") as fh:
            fh.write(data)


def run(request: dict, fds: dict[str, int], limits: Limits, ready_w: int) -> None:
    """The runner: everything before the code is ours; from ``exec`` on, nothing in this process is trusted,
    and all it can do is write one line to its own result pipe, which the checker validates."""
    result_fd = fds["result"]
    for cgroup_procs in fds.get("cgroups", []):
        os.write(cgroup_procs, b"0")  # join the run's cgroups: the file was opened by the checker
    if LAYER == "bubblewrap":
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        work = WORK
    else:
        os.setsid()
        work = request["work"]
    os.chdir(work)
    names = ["table.xlsx"] + ([request["file_name"] + ".xlsx"] if request.get("file_name") else [])
    if "table" in fds:
        write_table(fds["table"], names)
    code = b""
    while chunk := os.read(fds["code"], 1 << 20):
        code += chunk
    with open("solution.py", "wb") as fh:
        fh.write(code)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(fds["stderr"], 2)
    if LAYER == "bubblewrap":
        become_nobody()
    elif os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    set_limits(limits)  # after the user namespace: its process count is then this run's alone
    os.write(ready_w, b"1")
    os.closerange(3, result_fd)
    os.closerange(result_fd + 1, 1 << 16)
    os.environ.update(HOME=work, TMPDIR="/tmp" if LAYER == "bubblewrap" else work)
    shown = []
    plt.show = lambda *a, **k: shown.append(charts.read_chart())
    try:
        exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
        outcome = {"ok": True, "reading": shown[-1] if shown else charts.read_chart()}
    except BaseException as err:  # the code's failure is the result, whatever it raised
        outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    try:
        line = json.dumps(outcome).encode()
    except (TypeError, ValueError) as err:
        line = json.dumps({"ok": False, "error": f"unreadable chart: {err}"[:500]}).encode()
    write_all(result_fd, line + b"\n")
    os._exit(0)


# The zygote ---------------------------------------------------------------------------------------------------

def receive(control: socket.socket) -> tuple[dict, dict[str, int]] | None:
    message, ancillary, _, _ = control.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4))
    if not message:
        return None
    received: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received += list(memoryview(data).cast("i"))[: len(data) // 4]
    request = json.loads(message)
    names = request["fds"]
    fds = {name: received[i] for i, name in enumerate(names) if name != "cgroup"}
    fds["cgroups"] = [received[i] for i, name in enumerate(names) if name == "cgroup"]
    return request, fds


def warm_up() -> None:
    """What nearly every answer does once, done here once: its lazy imports and caches (fonts, the Agg renderer,
    pandas' Excel reader) are then already in each run's copy of this process."""
    import io

    buffer = io.BytesIO()
    pandas.DataFrame({"a": [1.5], "b": ["x"]}).to_excel(buffer, index=False)
    pandas.read_excel(io.BytesIO(buffer.getvalue()))
    plt.figure(figsize=(6, 4))
    plt.bar(["a", "b"], [1, 2], label="bars")
    plt.plot([0, 1], [1, 2], marker="o")
    plt.scatter([0, 1], [2, 1])
    plt.title("warm-up $x^2$")
    plt.xlabel("x")
    plt.ylabel("y")
    plt.xticks(rotation=45)
    plt.legend()
    plt.grid(True)
    plt.tight_layout()
    plt.figure()
    plt.pie([1, 2], labels=["a", "b"], autopct="%1.1f%%")
    charts.read_chart()
    plt.savefig(io.BytesIO())
    plt.close("all")


def serve() -> None:
    warm_up()
    control = socket.socket(fileno=CONTROL_FD)
    signal.signal(signal.SIGCHLD, lambda *_: reap())
    control.sendall(json.dumps({"ready": LAYER, "pid": os.getpid()}).encode())
    while True:
        try:
            got = receive(control)
        except InterruptedError:
            continue
        if got is None:
            return  # the checker went away
        request, fds = got
        if os.fork() == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                keep(request, fds)
            finally:
                os._exit(0)
        for fd in [fds["result"], *others(fds)]:
            os.close(fd)


def reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


if __name__ == "__main__":
    serve()
