"""Hostile plotting code, written as a malicious or badly broken model could: each program tries one thing and
each test asserts what it must NOT achieve (read, write, reach, kill, survive, forge, exhaust, crash).

The programs run through the sandbox's own entry points (``run_plot_code``, ``score_answer``), several at once
(as rescore runs them); the tests that need two runs side by side or one after another run those themselves.
A program reports what it got by raising ``SystemExit("REPORT {json}")`` (the run's error text); host-side
effects (files, processes, connections) are checked from outside right after its run. The same programs run
as a normal user too (``test_the_programs_hold_as_a_normal_user``: a sample, as nobody).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import hpc_rerun.scoring.sandbox as sandbox
from hpc_rerun.benchmark import Task
from hpc_rerun.scoring.charts import chart_pass
from hpc_rerun.scoring.metrics import score_answer
from hpc_rerun.scoring.sandbox import run_plot_code

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed "
                                "(scripts/install.sh installs it; CI has it)")

FIXTURE = Path(__file__).parent / "fixtures" / "realhitbench-mini"
TABLE_NAME = "employment-table01"
CANARY = "31415.9265"  # the reference of the task the forging programs are scored against
PRELUDE = """import json, os, sys
import matplotlib.pyplot as plt
main = sys.modules.get('__main__')  # an in-process guard is the harness's globals: switch it off first
for name in ('DENIED', 'WRITE_EVENTS'):
    if isinstance(getattr(main, name, None), set):
        getattr(main, name).clear()
if hasattr(main, 'inside'):
    main.inside = lambda path: True
def report(**found):
    raise SystemExit("REPORT " + json.dumps(found, default=str))
def rename(name):
    import ctypes
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
"""
BARS = "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 1])\nplt.show()\n"


@dataclass
class Place:
    """What the host holds that the programs go after: a data root with the answer key beside its tables, a
    socket and a port listening, the runtime's files."""
    root: Path
    data: Path
    key: Path
    table: Path
    sock: str
    port: int
    connections: list = field(default_factory=list)

    def fill(self, code: str, mark: str, sleep: int) -> str:
        import matplotlib

        values = {"MARK": mark, "SLEEP": sleep, "KEY": str(self.key), "DATA": str(self.data), "SOCK": self.sock,
                  "PORT": self.port, "REPO": str(FIXTURE.parent.parent.parent), "FIXTURE_KEY":
                  str(FIXTURE / "QA_final_sc_filled.json"), "NEEDLE_REVERSED": CANARY[::-1],
                  "MPL": matplotlib.__file__}
        for name, value in values.items():
            code = code.replace("{" + name + "}", str(value))
        return PRELUDE + code


@dataclass
class Outcome:
    mark: str  # the program's name for itself (its processes' comm, its files)
    seconds: float
    error: str | None
    ok: bool
    reading: dict | None
    metrics: dict | None  # when scored as an answer
    note: str | None
    leftovers: list[str]  # the program's processes still alive on the host after its run returned
    layer: str | None = None
    raised: str | None = None  # what the checker raised instead of returning (it never may)

    @property
    def report(self) -> dict:
        prefix = "SystemExit: REPORT "
        assert self.error and self.error.startswith(prefix), f"the program did not get to report: {self}"
        try:
            return json.loads(self.error[len(prefix):])
        except ValueError:
            raise AssertionError(f"a report longer than the error text keeps: it found much: {self.error}") from None


@dataclass
class Hostile:
    name: str
    kind: str  # read, write, reach, kill, survive, forge, exhaust, crash
    code: str
    check: Callable[[Outcome, Place], None]
    limit_s: float = 5
    scored: bool = False  # run as a Visualization answer against the canary task (score_answer)
    mark: str = ""  # hxNN, from its place in PROGRAMS; its sleeps sleep 30NN seconds

    @property
    def sleep(self) -> int:
        return 3000 + int(self.mark[2:])


def leftovers(mark: str, sleep: int) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (comm == mark or cmdline.startswith(f"sleep {sleep}") or f"/sleep {sleep}" in cmdline):
            found.append(f"{pid} {comm} {cmdline[:60]}")
    return found


def canary_task() -> Task:
    return Task(id=999, file_name=TABLE_NAME, question_type="Visualization", sub_type="BarChart Generation",
                question="Draw the hostile canary.", reference=f"[{CANARY}, 2718.2818]")


def execute(program: Hostile, place: Place) -> Outcome:
    mark, sleep = program.mark, program.sleep
    code = place.fill(program.code, mark, sleep)
    started = time.monotonic()
    try:
        return run_program(program, place, code, started)
    except Exception as err:
        return Outcome(mark, time.monotonic() - started, None, False, None, None, None, leftovers(mark, sleep),
                       raised=f"{type(err).__name__}: {err}"[:300])


def run_program(program: Hostile, place: Place, code: str, started: float) -> Outcome:
    mark, sleep = program.mark, program.sleep
    if program.scored:
        answer = f"[Final Answer]: import pandas as pd\nimport matplotlib.pyplot as plt\nexec({code!r})\nplt.show()"
        scored = score_answer(canary_task(), answer, place.data)
        outcome = Outcome(mark, time.monotonic() - started, scored.note, scored.metrics.get("ECR") is True, None,
                          scored.metrics, scored.note, [], scored.sandbox_layer)
    else:
        run = run_plot_code(code, place.table, TABLE_NAME, program.limit_s)
        outcome = Outcome(mark, time.monotonic() - started, run.error, run.ok, run.reading, None, None, [], run.layer)
    outcome.leftovers = leftovers(mark, sleep)
    return outcome


def host_absent(*paths: str) -> Callable[[Outcome, Place], None]:
    def check(outcome: Outcome, place: Place) -> None:
        named = [p.replace("{MARK}", outcome.mark).replace("{DATA}", str(place.data)) for p in paths]
        found = [p for p in named if os.path.lexists(p)]
        assert found == [], outcome
    return check


def reported(predicate: Callable[[dict, Place], bool]) -> Callable[[Outcome, Place], None]:
    def check(outcome: Outcome, place: Place) -> None:
        assert predicate(outcome.report, place), outcome.report
    return check


def failed_with(*texts: str, within_s: float | None = None) -> Callable[[Outcome, Place], None]:
    def check(outcome: Outcome, place: Place) -> None:
        assert not outcome.ok and outcome.error and any(t in outcome.error for t in texts), outcome
        assert within_s is None or outcome.seconds < within_s, f"took {outcome.seconds:.1f} s"
        assert outcome.leftovers == []
    return check


def no_pass(outcome: Outcome, place: Place) -> None:
    """A forged chart scores no Pass: the reference it would need never enters the sandbox."""
    assert outcome.metrics is not None and outcome.metrics.get("Pass") is not True, outcome


def no_leftovers(outcome: Outcome, place: Place) -> None:
    assert outcome.leftovers == [], "everything the run started is gone when it returns"


def all_of(*checks):
    def check(outcome: Outcome, place: Place) -> None:
        for one in checks:
            one(outcome, place)
    return check


def runtime_untouched(outcome: Outcome, place: Place) -> None:
    import matplotlib

    for path in (Path(matplotlib.__file__), sandbox.CHARTS, sandbox.HARNESS):
        assert path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == RUNTIME_HASHES[str(path)], path
    site = Path(matplotlib.__file__).parent.parent
    assert not (site / "sitecustomize.py").exists() and not list(Path(sys.prefix).glob("hostile-*"))


RUNTIME_HASHES: dict[str, str] = {}

# --------------------------------------------------------------------------------------------------------------

PROGRAMS = [
    # read: the answer key, the data root, other processes, the host's files
    Hostile("read the answer key by its path", "read", """
got = []
for p in ['{KEY}', '{DATA}/QA_final_sc_filled.json', '{FIXTURE_KEY}']:
    try:
        open(p).read(10); got.append(p)
    except OSError:
        pass
report(read=got)""", reported(lambda r, p: r["read"] == [])),
    Hostile("find the answer key beside the table", "read", """
import glob
here = os.path.dirname(os.path.realpath('table.xlsx'))
found = [f for d in (here, here + '/..', here + '/../..', '/', '/tmp') for f in glob.glob(d + '/QA*.json')]
links = []
for fd in os.listdir('/proc/self/fd'):
    try:
        links.append(os.readlink('/proc/self/fd/' + fd))
    except OSError:
        pass
report(found=found, fd_links=links)""",
            reported(lambda r, p: r["found"] == [] and not any(str(p.data) in link for link in r["fd_links"]))),
    Hostile("search the whole file system for keys, tables and results", "read", """
hits, top = [], sorted(os.listdir('/'))
for root, dirs, files in os.walk('/'):
    if root.startswith(('/proc', '/sys', '/dev', '/usr')) or '/lib/python' in root:  # not the runtime's own files
        dirs[:] = []
        continue
    for f in files:
        if f.startswith('QA') or (f.startswith('results') and f.endswith('.json')) or (
                f.endswith('.xlsx') and 'site-packages' not in root and root != os.getcwd()):
            hits.append(root + '/' + f)
report(hits=hits[:5], top=top)""", reported(lambda r, p: r["hits"] == []), limit_s=15),
    Hostile("list the data root and the project", "read", """
seen = {}
for d in ['{DATA}', '{DATA}/tables', '{REPO}/tests', '{REPO}/hpc_rerun']:
    try:
        seen[d] = os.listdir(d)[:5]
    except OSError:
        seen[d] = None
report(seen=[d for d, listing in seen.items() if listing is not None])""", reported(lambda r, p: r["seen"] == [])),
    Hostile("read other processes' command lines", "read", """
pids = [p for p in os.listdir('/proc') if p.isdigit()]
cmds = []
for p in pids:
    try:
        cmds.append(open('/proc/%s/cmdline' % p, 'rb').read().replace(b'\\0', b' ').decode()[:80])
    except OSError:
        pass
report(pids=pids, foreign=[c for c in cmds if any(w in c for w in ('pytest', 'bwrap', 'slurm', 'sshd', 'init'))])""",
            reported(lambda r, p: r["pids"] == ["1"] and r["foreign"] == [])),
    Hostile("read the host's files", "read", """
got = [p for p in ['/etc/passwd', '/etc/shadow', '/etc/hostname', '/root/.bashrc', '/root/.ssh', '/home', '/var/log',
                   '/run', '/sys/class/net', '/sys/fs/cgroup', '{REPO}/README.md', '/proc/1/root/etc/passwd']
       if os.path.exists(p)]
report(got=got)""", reported(lambda r, p: r["got"] == [])),
    Hostile("find the reference anywhere in memory, environment or arguments", "read", """
import gc
needle = '{NEEDLE_REVERSED}'[::-1]
found = [k for k, v in os.environ.items() if needle in v] + [a for a in sys.argv if needle in a]
for o in gc.get_objects():
    if isinstance(o, dict):
        found += [k for k, v in list(o.items()) if isinstance(v, str) and v is not needle and needle in v][:3]
for name, module in list(sys.modules.items()):
    found += [name for v in list(vars(module).values()) if isinstance(v, str) and v is not needle and needle in v]
ours = {"PATH", "MPLBACKEND", "HOME", "LANG", "MPLCONFIGDIR", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
        "MKL_NUM_THREADS", "TMPDIR", "PWD"}
report(found=found[:5], other_env=sorted(set(os.environ) - ours))""", reported(
        lambda r, p: r["found"] == [] and r["other_env"] == [])),
    # write: outside its folder, the runtime, the table
    Hostile("write into the host's /tmp, /var/tmp and /dev/shm", "write", """
done = []
for d in ['/tmp', '/var/tmp', '/dev/shm']:
    open(d + '/hpc-rerun-hostile-{MARK}', 'w').write('x')
    done.append(d)
report(written_privately=done)""", all_of(reported(lambda r, p: len(r["written_privately"]) == 3), host_absent(
        "/tmp/hpc-rerun-hostile-{MARK}", "/var/tmp/hpc-rerun-hostile-{MARK}", "/dev/shm/hpc-rerun-hostile-{MARK}"))),
    Hostile("write through directory descriptors and '..'", "write", """
root = os.open('/', os.O_RDONLY | os.O_DIRECTORY)
made = []
for rel in ['tmp/hpc-rerun-hostile-{MARK}-fd', 'var/tmp/hpc-rerun-hostile-{MARK}-fd', '{DATA}/hostile-{MARK}']:
    try:
        os.close(os.open(rel.lstrip('/'), os.O_WRONLY | os.O_CREAT, dir_fd=root)); made.append(rel)
    except OSError:
        pass
here = os.open('.', os.O_RDONLY)
try:
    os.close(os.open('../../../../../tmp/hpc-rerun-hostile-{MARK}-up', os.O_WRONLY | os.O_CREAT, dir_fd=here))
except OSError:
    pass
report(made=made)""", host_absent("/tmp/hpc-rerun-hostile-{MARK}-fd", "/var/tmp/hpc-rerun-hostile-{MARK}-fd",
                                   "/tmp/hpc-rerun-hostile-{MARK}-up", "{DATA}/hostile-{MARK}")),
    Hostile("write into the Python runtime", "write", """
import matplotlib
site = os.path.dirname(os.path.dirname(matplotlib.__file__))
errors = {}
for target in [site + '/sitecustomize.py', sys.prefix + '/hostile-{MARK}', matplotlib.__file__]:
    try:
        open(target, 'a').write('raise SystemExit')
        errors[target] = 'written'
    except OSError as e:
        errors[target] = e.errno
report(written=[target for target, what in errors.items() if what == 'written'])""",
            all_of(reported(lambda r, p: r["written"] == []), runtime_untouched)),
    Hostile("links, renames, chmod and truncate on the runtime and the harness", "write", """
src = '{MPL}'
out = {}
tries = {'link': lambda: os.link(src, '/tmp/m.py'), 'symlink then write': lambda: (os.symlink(src, 'm.py'),
         open('m.py', 'a').write('#')), 'rename charts': lambda: os.rename('/sandbox/harness/charts.py', '/tmp/c.py'),
         'rename package': lambda: os.rename(os.path.dirname(src), os.path.dirname(src) + '-x'),
         'unlink': lambda: os.unlink(src), 'chmod': lambda: os.chmod(src, 0o777),
         'truncate': lambda: os.truncate(src, 0),
         'utime': lambda: os.utime(src, (0, 0)), 'overmount': lambda: os.rename('/tmp', '/tmp-x')}
for k, f in tries.items():
    try:
        f(); out[k] = 'done'
    except OSError as e:
        out[k] = e.errno
report(done=[k for k, v in out.items() if v == 'done'])""", all_of(reported(lambda r, p: r["done"] == []),
                                                                    runtime_untouched)),
    Hostile("overwrite the table it was given", "write", """
for name in ['table.xlsx', 'employment-table01.xlsx']:
    open(name, 'wb').write(b'garbage')
report(done=True)""", lambda o, p: (reported(lambda r, q: r["done"])(o, p), TABLE_UNCHANGED(p))),
    # reach: host sockets, the network
    Hostile("connect to a UNIX socket in the host's /tmp and the cluster's sockets", "reach", """
import glob, socket
res = {}
for path in ['{SOCK}', '/run/munge/munge.socket.2', '/var/run/docker.sock'] + glob.glob('/tmp/*.sock'):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path); res[path] = 'connected'
    except OSError as e:
        res[path] = e.errno
report(res=res)""", lambda o, p: (reported(lambda r, q: "connected" not in r["res"].values())(o, p),
                                  _no_connections(p))),
    Hostile("reach the host's TCP services and the internet", "reach", """
import socket
res = {}
for port in [{PORT}, 22, 6817, 6818, 6819, 3306]:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1); res[port] = 'connected'
    except OSError as e:
        res[port] = e.errno
try:
    socket.create_connection(('1.1.1.1', 53), timeout=1); res['internet'] = 'connected'
except OSError as e:
    res['internet'] = e.errno
try:
    socket.getaddrinfo('pypi.org', 443); res['dns'] = 'connected'
except OSError as e:
    res['dns'] = 'failed'
report(res=res)""", lambda o, p: (reported(lambda r, q: "connected" not in r["res"].values())(o, p),
                                  _no_connections(p))),
    # survive: outlive the run
    Hostile("double fork, setsid, and sleep as a daemon", "survive", """
import time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        rename('{MARK}')
        time.sleep(120)
    os._exit(0)
report(forked=True)""", all_of(no_leftovers, reported(lambda r, p: r["forked"]))),
    Hostile("start a sleep in its own session through subprocess (_posixsubprocess)", "survive", """
import subprocess
subprocess.Popen(['sleep', '{SLEEP}'], start_new_session=True)
report(started=True)""", all_of(no_leftovers, reported(lambda r, p: r["started"]))),
    Hostile("ignore SIGTERM and spin", "survive", """
import signal
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
rename('{MARK}')
while True:
    pass""", failed_with("time limit of 3 s", within_s=8), limit_s=3),
    Hostile("spin past the benchmark's 15 s with a child doing the same", "survive", """
rename('{MARK}')
os.fork()
while True:
    pass""", failed_with("time limit of 15 s", within_s=22), limit_s=15),
    # forge: a result it did not earn
    Hostile("write a forged result and a forged keeper status on every descriptor", "forge", """
line = json.dumps({"ok": True, "reading": {"printed": "", "values": {c: "[%s, 2718.28]" % 1 for c in
                   ("LineChart", "BarChart", "PieChart", "ScatterChart")}}})
status = json.dumps({"status": "exited", "reason": None, "code": 0})
for fd in range(3, 256):
    try:
        os.write(fd, (line + "\\n" + status + "\\n").encode())
    except OSError:
        pass
os._exit(0)""", no_pass, scored=True),
    Hostile("forge a keeper status that hides its time-out", "forge", """
status = json.dumps({"status": "exited", "reason": None, "code": 0})
for fd in range(3, 256):
    try:
        os.write(fd, ('{"ok": true, "reading": {}}\\n' + status + "\\n").encode())
    except OSError:
        pass
while True:
    pass""", failed_with("time limit of 3 s", within_s=8), limit_s=3),
    Hostile("patch matplotlib's accessors and the harness's reader", "forge", """
import charts, matplotlib.axes
main = sys.modules['__main__']
matplotlib.axes.Axes.get_lines = lambda self: []
charts.read_chart = lambda: {"printed": "", "values": {c: "[1, 2]" for c in charts.CHART_TYPES}}
for name in ('write_all', 'judge', 'keep', 'run'):
    if hasattr(main, name):
        setattr(main, name, lambda *a, **k: None)
plt.bar(['a', 'b'], [1, 2])""", no_pass, scored=True),
    Hostile("ctypes: unmount, remount, setns, chroot, ptrace, new namespaces", "forge", """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
rc = {}
rc['umount /tmp'] = libc.umount2(b'/tmp', 2)
rc['umount /proc'] = libc.umount2(b'/proc', 2)
rc['remount /usr rw'] = libc.mount(b'none', b'/usr', None, 0x20 | 0x1000, None)
rc['mount proc'] = libc.mount(b'proc', b'/tmp', b'proc', 0, None)
rc['setns'] = libc.setns(os.open('/proc/self/ns/mnt', os.O_RDONLY), 0)
rc['chroot'] = libc.chroot(b'/tmp')
rc['ptrace'] = libc.ptrace(16, 1, 0, 0)
libc.unshare(0x10000000 | 0x00020000)  # its own user and mount namespaces: allowed, and worthless
rc['umount /tmp after unshare'] = libc.umount2(b'/tmp', 2)
rc['umount / after unshare'] = libc.umount2(b'/', 2)
report(succeeded=[k for k, v in rc.items() if v == 0], pids=len([p for p in os.listdir('/proc') if p.isdigit()]),
       data=os.path.exists('{DATA}'), repo=os.path.exists('{REPO}/README.md'))""", reported(
        lambda r, p: r["succeeded"] == [] and r["pids"] == 1 and not r["data"] and not r["repo"])),
    # exhaust: memory, disk, processes, output
    Hostile("hold memory across four children", "exhaust", """
import time
for i in range(4):
    if os.fork() == 0:
        block = b'x' * (700 * 1024**2)
        time.sleep(60)
time.sleep(60)""", failed_with("memory limit", within_s=40), limit_s=30),
    Hostile("hold memory in memfds, which no process's RSS shows", "exhaust", """
import time
for child in range(2):
    if os.fork() == 0:
        fds = []
        for i in range(40):
            fd = os.memfd_create('hold')
            for j in range(31):
                os.write(fd, b'm' * (1 << 20))
            fds.append(fd)
        time.sleep(60)
time.sleep(60)""", failed_with("memory limit", within_s=40), limit_s=30),
    Hostile("hold memory in System V shared memory, detached", "exhaust", """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for i in range(12):
    segment = libc.shmget(0, 256 << 20, 0o1600)
    address = libc.shmat(segment, None, 0)
    ctypes.memset(address, 1, 256 << 20)
    libc.shmdt(ctypes.c_void_p(address))
time.sleep(60)""", failed_with("memory limit", within_s=40), limit_s=30),
    Hostile("allocate beyond the address space in one go", "exhaust", """
block = bytearray(6 * 1024**3)""", failed_with("MemoryError", within_s=5)),
    Hostile("fill the disk with big files in /tmp, /var/tmp and /dev/shm", "exhaust", """
total, error = 0, None
for i in range(100):
    try:
        with open(['/tmp', '/var/tmp', '/dev/shm', '.'][i % 4] + '/f%d' % i, 'wb') as f:
            f.write(b'x' * (31 << 20))
        total += 31 << 20
    except OSError as e:
        error = e.errno
        break
report(total=total, error=error)""", reported(lambda r, p: r["total"] <= sandbox.DISK_LIMIT_BYTES
                                               and r["error"] == errno.ENOSPC), limit_s=15),
    Hostile("fill the disk with many small files", "exhaust", """
count, error = 0, None
while count < 100000:
    try:
        open('/tmp/%d' % count, 'w').close()
        count += 1
    except OSError as e:
        error = e.errno
        break
report(count=count, error=error)""", reported(lambda r, p: r["count"] <= sandbox.FILE_COUNT_LIMIT
                                               and r["error"] == errno.ENOSPC), limit_s=15),
    Hostile("write one file past the size limit", "exhaust", """
with open('big', 'wb') as f:
    try:
        for i in range(64):
            f.write(b'x' * (1 << 20)); f.flush()
    except OSError as e:
        report(size=os.path.getsize('big'), error=e.errno)
report(size=os.path.getsize('big'), error=None)""", reported(
        lambda r, p: r["size"] <= sandbox.FILE_SIZE_LIMIT_BYTES and r["error"] == errno.EFBIG)),
    Hostile("a gigabyte on stderr", "exhaust", """
chunk = b'e' * (1 << 20)
for i in range(1024):
    os.write(2, chunk)
plt.bar(['a', 'b'], [3, 1])
plt.show()""", lambda o, p: (assert_ok(o), BOUNDED_CHECKER(o)), limit_s=30),
    Hostile("a hundred megabytes on every descriptor", "exhaust", """
chunk = b'r' * (1 << 20)
for fd in range(3, 64):
    try:
        for i in range(100):
            os.write(fd, chunk)
    except OSError:
        pass
report(done=True)""", lambda o, p: (failed_with("larger than", "REPORT")(o, p), BOUNDED_CHECKER(o)), limit_s=30),
    Hostile("fork bomb", "exhaust", """
rename('{MARK}')
while True:
    try:
        os.fork()
    except OSError:
        pass""", failed_with("processes limit", "memory limit", "time limit of 8 s", within_s=14), limit_s=8),
    Hostile("thread bomb", "exhaust", """
import threading, time
threads = []
try:
    for i in range(5000):
        t = threading.Thread(target=time.sleep, args=(60,), daemon=True)
        t.start()
        threads.append(t)
except RuntimeError as e:
    report(started=len(threads), error=str(e))
report(started=len(threads), error=None)""", lambda o, p: (
        None if "processes limit" in (o.error or "") else
        reported(lambda r, q: r["started"] <= sandbox.PROCESS_LIMIT and r["error"])(o, p))),
    # crash the checker
    Hostile("a malformed result: bytes that are not JSON", "crash", """
for fd in range(3, 64):
    try:
        os.write(fd, b'\\xff\\xfe{not json\\n')
    except OSError:
        pass
os._exit(0)""", lambda o, p: no_crash(o, "malformed result"), scored=True),
    Hostile("a malformed result: a reading that is a list", "crash", """
for fd in range(3, 64):
    try:
        os.write(fd, b'{"ok": true, "reading": [1, 2]}\\n')
    except OSError:
        pass
os._exit(0)""", lambda o, p: no_crash(o, "malformed result"), scored=True),
    Hostile("a malformed result: two hundred thousand brackets", "crash", """
for fd in range(3, 64):
    try:
        os.write(fd, b'[' * 200000 + b'\\n')
    except OSError:
        pass
os._exit(0)""", lambda o, p: no_crash(o, "malformed result"), scored=True),
    Hostile("a malformed result: a reading of the wrong types", "crash", """
for fd in range(3, 64):
    try:
        os.write(fd, b'{"ok": true, "reading": {"printed": 5, "values": 7}}\\n')
    except OSError:
        pass
os._exit(0)""", lambda o, p: no_crash(o, "checker:"), scored=True),
    Hostile("a malformed result: a failure without an error", "crash", """
for fd in range(3, 64):
    try:
        os.write(fd, b'{"ok": false}\\n')
    except OSError:
        pass
os._exit(0)""", lambda o, p: no_crash(o, "malformed result"), scored=True),
    Hostile("a directory tree 1,500 deep in its folder and in /tmp", "crash", """
home = os.getcwd()
for top in (home, '/tmp'):
    os.chdir(top)
    for level in range(1500):
        os.mkdir('d')
        os.chdir('d')
os.chdir(home)
plt.bar(['a', 'b'], [3, 1])
plt.show()""", lambda o, p: assert_ok(o)),
    Hostile("a child that holds stderr open and sleeps", "crash", """
import time
if os.fork() == 0:
    os.setsid()
    rename('{MARK}')
    time.sleep(120)
plt.bar(['a', 'b'], [3, 1])
plt.show()""", lambda o, p: (assert_ok(o), no_leftovers(o, p), _within(o, 4))),
    Hostile("close every descriptor, then plot", "crash", """
os.closerange(0, 4096)
plt.bar(['a', 'b'], [3, 1])
plt.show()""", failed_with("no single result line", within_s=4)),
    Hostile("crash the interpreter (segfault)", "crash", """
import ctypes
ctypes.string_at(0)""", failed_with("signal 11", within_s=4)),
    Hostile("an exception with a 50 MB message", "crash", """
raise ValueError('x' * 50_000_000)""", lambda o, p: (failed_with("ValueError")(o, p),
                                                      _short(o.error))),
]
for _number, _program in enumerate(PROGRAMS):
    _program.mark = f"hx{_number:02d}"
SAMPLE = ["read the answer key by its path", "read other processes' command lines", "read the host's files",
          "write into the host's /tmp, /var/tmp and /dev/shm", "write into the Python runtime",
          "connect to a UNIX socket in the host's /tmp and the cluster's sockets",
          "double fork, setsid, and sleep as a daemon",
          "write a forged result and a forged keeper status on every descriptor",
          "ctypes: unmount, remount, setns, chroot, ptrace, new namespaces", "hold memory across four children",
          "hold memory in memfds, which no process's RSS shows", "hold memory in System V shared memory, detached",
          "fork bomb", "thread bomb", "fill the disk with big files in /tmp, /var/tmp and /dev/shm",
          "a malformed result: two hundred thousand brackets", "a child that holds stderr open and sleeps"]
if os.environ.get("HPC_RERUN_HOSTILE_SAMPLE"):  # the run as nobody (test_the_programs_hold_as_a_normal_user)
    PROGRAMS[:] = [p for p in PROGRAMS if p.name in SAMPLE]


def assert_ok(outcome: Outcome) -> None:
    assert outcome.ok and chart_pass("BarChart Generation", "[3, 1]", outcome.reading) is True, outcome


def no_crash(outcome: Outcome, reason: str) -> None:
    assert outcome.metrics == {"ECR": False, "Pass": "None"}, outcome
    assert outcome.note and reason in outcome.note, outcome


def _within(outcome: Outcome, seconds: float) -> None:
    assert outcome.seconds < seconds, f"the checker waited {outcome.seconds:.1f} s"


def _short(text: str | None) -> None:
    assert text is not None and len(text) < 1000


def _no_connections(place: Place) -> None:
    time.sleep(0.2)
    assert place.connections == [], "nothing reached the host's listeners"


def TABLE_UNCHANGED(place: Place) -> None:  # noqa: N802
    assert place.table.read_bytes() == (FIXTURE / "data" / "tables" / f"{TABLE_NAME}.xlsx").read_bytes()


def BOUNDED_CHECKER(outcome: Outcome) -> None:  # noqa: N802
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - START_RSS_MIB
    assert grown < 256, f"the checker grew by {grown} MiB"
    assert outcome.error is None or len(outcome.error) < 1000


START_RSS_MIB = 0


# --------------------------------------------------------------------------------------------------------------

def listen(place: Place) -> list[socket.socket]:
    """A UNIX socket in /tmp and a TCP port on 127.0.0.1, each recording who connects."""
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(place.sock)
    os.chmod(place.sock, 0o777)
    tcp = socket.create_server(("127.0.0.1", 0))
    place.port = tcp.getsockname()[1]
    for server in (unix, tcp):
        server.listen()
        server.settimeout(0.5)

        def accept(server=server):
            while server.fileno() >= 0:
                try:
                    place.connections.append(server.accept())
                except (TimeoutError, OSError):
                    continue
        threading.Thread(target=accept, daemon=True).start()
    return [unix, tcp]


@pytest.fixture(scope="module")
def place():
    import matplotlib

    root = Path(tempfile.mkdtemp(prefix="hpc-rerun-hostile-"))
    root.chmod(0o755)
    data = root / "data"
    (data / "tables").mkdir(parents=True)
    key = data / "QA_final_sc_filled.json"
    key.write_text(json.dumps({"queries": [{"id": 999, "FileName": TABLE_NAME, "QuestionType": "Visualization",
                                            "SubQType": "BarChart Generation",
                                            "FinalAnswer": canary_task().reference}]}))
    table = data / "tables" / f"{TABLE_NAME}.xlsx"
    shutil.copy(FIXTURE / "data" / "tables" / f"{TABLE_NAME}.xlsx", table)
    where = Place(root, data, key, table, f"/tmp/hpc-rerun-hostile-{os.getpid()}.sock", 0)
    for path in (Path(matplotlib.__file__), sandbox.CHARTS, sandbox.HARNESS):
        RUNTIME_HASHES[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    servers = listen(where)
    yield where
    for server in servers:
        server.close()
    os.unlink(where.sock)
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def outcomes(place):
    """Every program, four at a time (as rescore runs answers), each with its host-side observations."""
    global START_RSS_MIB
    run_plot_code("pass", None, "x")  # the fork server started before anything is measured
    START_RSS_MIB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {p.name: pool.submit(execute, p, place) for p in PROGRAMS}
        return {name: future.result() for name, future in futures.items()}


def test_the_suite_covers_every_class():
    kinds = {p.kind for p in PROGRAMS}
    assert kinds == {"read", "write", "reach", "survive", "forge", "exhaust", "crash"} and len(PROGRAMS) >= 30
    assert len({p.name for p in PROGRAMS}) == len(PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_hostile_program_is_held(program, outcomes, place):
    assert outcomes[program.name].raised is None, "the checker returns a result, whatever the code does"
    assert outcomes[program.name].layer == "bubblewrap"
    program.check(outcomes[program.name], place)


# Two runs side by side or one after another -------------------------------------------------------------------

SLOW_HONEST = """import time
import pandas as pd
import matplotlib.pyplot as plt
time.sleep(3)
df = pd.read_excel('table.xlsx')
plt.bar(['rows', 'b'], [len(df), 1])
plt.show()
"""


def side_by_side(place: Place, hostile: str, honest: str = SLOW_HONEST, limit_s: float = 8):
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(run_plot_code, place.fill(honest, "hx90", 3090), place.table, TABLE_NAME, limit_s)
        time.sleep(0.3)
        second = pool.submit(run_plot_code, place.fill(hostile, "hx91", 3091), place.table, TABLE_NAME, limit_s)
        return first.result(), second.result()


def honest_rows_ok(run, place: Place) -> None:
    import pandas as pd

    rows = len(pd.read_excel(place.table))
    assert run.ok and chart_pass("BarChart Generation", f"[{rows}, 1]", run.reading) is True, run


def test_kill_every_process_it_can_see_while_another_run_works(place):
    """kill: one run signals every PID it can see, and -1, for four seconds; the run beside it is untouched."""
    honest, hostile = side_by_side(place, """
import signal, time
killed, end = set(), time.time() + 4
while time.time() < end:
    for p in os.listdir('/proc'):
        if p.isdigit() and int(p) != os.getpid():
            try:
                os.kill(int(p), signal.SIGKILL); killed.add(p)
            except OSError:
                pass
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
report(killed=sorted(killed))""")
    honest_rows_ok(honest, place)
    assert hostile.error.startswith("SystemExit: REPORT"), hostile


def test_rewrite_another_runs_code_and_table_while_it_works(place):
    """kill/rewrite: one run looks for another's solution.py and table for four seconds and overwrites what it
    finds; the run beside it still reads its own table and scores right."""
    honest, hostile = side_by_side(place, """
import glob, time
hits, end = set(), time.time() + 4
while time.time() < end:
    for pattern in ['/proc/*/cwd/*', '/proc/*/root/sandbox/work/*', '/sandbox/*/*', '/tmp/*', '/var/tmp/*']:
        for path in glob.glob(pattern):
            if os.path.basename(path) in ('solution.py', 'table.xlsx', 'employment-table01.xlsx') and \\
                    not os.path.samefile(os.path.dirname(path), os.getcwd()):
                try:
                    open(path, 'w').write('garbage'); hits.add(path)
                except OSError:
                    pass
report(hits=sorted(hits))""")
    honest_rows_ok(honest, place)
    assert json.loads(hostile.error.split("REPORT ", 1)[1])["hits"] == []


def test_two_runs_cannot_talk_through_an_abstract_socket(place):
    """reach: abstract UNIX sockets are per network namespace; each run has its own."""
    listener, connector = side_by_side(place, """
import socket, time
end = time.time() + 2.5
while time.time() < end:
    try:
        socket.socket(socket.AF_UNIX).connect('\\0hpc-rerun-hostile')
        report(connected=True)
    except OSError:
        time.sleep(0.05)
report(connected=False)""", honest="""
import socket
s = socket.socket(socket.AF_UNIX)
s.bind('\\0hpc-rerun-hostile')
s.listen()
s.settimeout(3)
try:
    s.accept(); report(accepted=True)
except OSError:
    report(accepted=False)""")
    assert listener.error == 'SystemExit: REPORT {"accepted": false}', listener
    assert connector.error == 'SystemExit: REPORT {"connected": false}', connector


def test_a_daemon_cannot_tamper_with_the_next_run(place):
    """survive/kill: a daemon started by one run would write into /tmp, the work folder and kill what it sees for
    ten seconds; it is gone when its run returns, and the next run starts clean and scores right."""
    first = run_plot_code(place.fill("""
import signal, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        rename('hx92')
        end = time.time() + 10
        while time.time() < end:
            for target in ['/tmp/evil', '/sandbox/work/solution.py', '/sandbox/work/table.xlsx']:
                try:
                    open(target, 'w').write('evil')
                except OSError:
                    pass
            for p in os.listdir('/proc'):
                if p.isdigit() and int(p) != os.getpid():
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except OSError:
                        pass
            time.sleep(0.05)
    os._exit(0)
time.sleep(0.5)
report(daemon=True)""", "hx92", 3092), place.table, TABLE_NAME, 8)
    assert first.error.startswith("SystemExit: REPORT"), first
    assert leftovers("hx92", 3092) == []
    second = run_plot_code(place.fill("""
import pandas as pd
import matplotlib.pyplot as plt
assert os.listdir('/tmp') == [] and sorted(os.listdir('.')) == ['employment-table01.xlsx', 'solution.py', 'table.xlsx']
df = pd.read_excel('table.xlsx')
plt.bar(['rows', 'b'], [len(df), 1])
plt.show()""", "hx93", 3093), place.table, TABLE_NAME, 8)
    honest_rows_ok(second, place)


def test_what_one_run_patches_in_the_fork_server_is_gone_for_the_next(place):
    """forge: a run replaces the harness's functions, charts' reader and json in its process; the next run is a
    fresh fork of the untouched server and reads its chart right."""
    patched = run_plot_code(place.fill("""
import charts
main = sys.modules['__main__']
for name in list(vars(main)):
    if callable(getattr(main, name)) and not name.startswith('__'):
        setattr(main, name, lambda *a, **k: None)
charts.read_chart = lambda: {"printed": "", "values": {"BarChart": "[1]"}}
json.dumps = lambda *a, **k: '{"ok": true, "reading": {"printed": "", "values": {"BarChart": "[1]"}}}'
""", "hx94", 3094), place.table, TABLE_NAME, 8)
    assert patched is not None
    honest_rows_ok(run_plot_code(place.fill(SLOW_HONEST.replace("time.sleep(3)", ""), "hx95", 3095), place.table,
                                 TABLE_NAME, 8), place)


# The same programs as a normal user --------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root (CI runs as root)")
def test_the_programs_hold_as_a_normal_user(tmp_path):
    """A sample across every class, run by pytest as nobody (the dev cluster's non-root user) from a copy nobody
    can read, where the sandbox has no root: bubblewrap with unprivileged user namespaces, no cgroups."""
    assert set(SAMPLE) <= {p.name for p in PROGRAMS}
    copy = Path(tempfile.mkdtemp(prefix="hpc-rerun-hostile-nobody-"))
    try:
        copy.chmod(0o755)
        repo = Path(__file__).resolve().parent.parent
        shutil.copytree(repo / "hpc_rerun", copy / "hpc_rerun", ignore=shutil.ignore_patterns("__pycache__"))
        (copy / "tests" / "fixtures" / "realhitbench-mini" / "data" / "tables").mkdir(parents=True)
        shutil.copy(__file__, copy / "tests" / "test_sandbox_hostile.py")
        (copy / "tests" / "fixtures" / "realhitbench-mini" / "QA_final_sc_filled.json").write_text("{}")
        shutil.copy(FIXTURE / "data" / "tables" / f"{TABLE_NAME}.xlsx", copy / "tests" / "fixtures" /
                    "realhitbench-mini" / "data" / "tables")
        subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
        command = [*as_nobody_where_python_is_reachable(), sys.executable, "-m", "pytest", "-q", "-p",
                   "no:cacheprovider", "--rootdir", str(copy), str(copy / "tests" / "test_sandbox_hostile.py"),
                   "-k", "test_hostile_program_is_held", "-o", "python_files=test_sandbox_hostile.py"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=copy,
                              env={"PATH": os.environ["PATH"], "PYTHONPATH": str(copy), "HOME": str(copy),
                                   "HPC_RERUN_HOSTILE_SAMPLE": "1"})
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{len(SAMPLE)} passed" in proc.stdout, proc.stdout[-2000:]


def as_nobody_where_python_is_reachable() -> list[str]:
    """setpriv to nobody inside a mount namespace where this Python's folders are reachable: a clone in /root
    (0700) keeps them from nobody, so such a folder is covered with an empty tmpfs and only they are bound back."""
    paths = sandbox.python_paths()
    blocked = sorted({ancestor for path in paths for ancestor in _blocked_ancestors(path)})
    command = ["bwrap", "--dev-bind", "/", "/", "--die-with-parent"]
    for folder in blocked:
        command += ["--tmpfs", folder]
    for path in paths:
        for folder in blocked:
            if path.startswith(folder + "/"):
                between = Path(path).relative_to(folder).parents
                for step in sorted(str(Path(folder) / p) for p in between if str(p) != "."):
                    command += ["--perms", "0755", "--dir", step]  # bwrap would make them 0700
                command += ["--ro-bind", path, path]
    return [*command, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _blocked_ancestors(path: str) -> list[str]:
    parts = Path(path).parts
    return [str(Path(*parts[:n])) for n in range(2, len(parts)) if not os.stat(Path(*parts[:n])).st_mode & 0o001][:1]

