"""Inside the sandbox: run solution.py under an audit hook and record what its figure plots.

Usage: python -I _plot_harness.py WORK_DIR RESULT_JSON. Writes {"ok", "y", "error"} to RESULT_JSON
(opened before the hook is installed, so the code itself cannot reach it by name).
"""

import json
import os
import sys

work_dir, result_path = os.path.realpath(sys.argv[1]), sys.argv[2]
result_file = open(result_path, "w")
os.chdir(work_dir)

import matplotlib  # noqa: E402  (imported before the hook so its own file access is not in the way)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402,F401
import pandas  # noqa: E402,F401
from matplotlib.patches import Rectangle, Wedge  # noqa: E402

DENIED = {"socket.connect", "socket.bind", "socket.sendto", "os.fork", "os.forkpty", "os.system", "os.posix_spawn",
          "os.spawn", "os.exec", "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "os.putenv"}
WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
                "os.truncate", "shutil.rmtree"}


def inside(path) -> bool:
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except (TypeError, ValueError):
        return False
    return real == work_dir or real.startswith(work_dir + os.sep)


def audit(event, args):
    if event in DENIED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR))
        if writing and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
    if event in WRITE_EVENTS and args and not inside(args[0]):
        raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")


def plotted_values():
    values = []
    for number in plt.get_fignums():
        for ax in plt.figure(number).axes:
            for line in ax.get_lines():
                values.extend(float(v) for v in line.get_ydata())
            for patch in ax.patches:
                if isinstance(patch, Wedge):
                    values.append((patch.theta2 - patch.theta1) / 360.0)
                elif isinstance(patch, Rectangle):
                    values.append(float(patch.get_height()))
            for collection in ax.collections:
                offsets = collection.get_offsets()
                if len(offsets):
                    values.extend(float(y) for y in offsets[:, 1])
    return values


shown = []
plt.show = lambda *a, **k: shown.append(plotted_values())
code = open("solution.py").read()
sys.addaudithook(audit)
try:
    exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
    y = shown[-1] if shown else plotted_values()
    outcome = {"ok": True, "y": y}
except BaseException as err:  # the code's failure is the result, whatever it raised
    outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
result_file.write(json.dumps(outcome))
result_file.close()
