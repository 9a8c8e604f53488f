"""Inside the sandbox: run solution.py under an audit hook and record what its figure plots.

Usage: python -I _plot_harness.py WORK_DIR RESULT_JSON [UID GID]. Writes {"ok", "y", "error"} to
RESULT_JSON (opened before the hook is installed, so the code itself cannot reach it by name).

With UID GID (started as root, in a mount namespace of its own), it first makes this Python and its
packages readable by that user, and nothing else: a folder on their way that the user cannot enter (a
clone in /root, mode 0700) is covered with an empty tmpfs and only those paths are bound back, read-only.
Then it becomes UID/GID, before anything of the model's runs.
"""

import json
import os
import subprocess
import sys

work_dir, result_path = os.path.realpath(sys.argv[1]), sys.argv[2]
result_file = open(result_path, "w")


def blocked_ancestor(path: str) -> str | None:
    """The first folder from / down to ``path`` that others cannot enter."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:depth])
        if os.path.isdir(folder) and not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def python_paths() -> set[str]:
    """Where this Python and its packages are: prefixes, sys.path, and where links in those folders lead."""
    roots = [p for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path] if p and os.path.exists(p)]
    found = {os.path.realpath(p) for p in roots}
    for root in roots:
        if os.path.isdir(root):
            with os.scandir(root) as entries:
                found |= {os.path.realpath(e.path) for e in entries if e.is_symlink() and os.path.exists(e.path)}
    return found


def expose_python() -> None:
    needed = sorted(p for p in python_paths() if blocked_ancestor(p) and p != blocked_ancestor(p))
    staging = os.path.join(os.path.dirname(work_dir), "expose")
    covers = sorted({blocked_ancestor(p) for p in needed})
    for cover in covers:
        if work_dir.startswith(cover + os.sep):
            sys.exit(f"the sandbox folder {work_dir} is inside {cover}, which this Python is hidden in from "
                     "nobody; set TMPDIR to a folder outside it")

    def mount_point(path: str, like: str) -> None:  # a bind mount needs a file for a file, a folder for a folder
        if os.path.isdir(like):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()

    for number, path in enumerate(needed):
        mount_point(f"{staging}/{number}", path)
        subprocess.run(["mount", "--bind", path, f"{staging}/{number}"], check=True)
    for cover in covers:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", cover], check=True)
    for number, path in enumerate(needed):
        mount_point(path, f"{staging}/{number}")
        subprocess.run(["mount", "--bind", f"{staging}/{number}", path], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)


if len(sys.argv) > 4:
    expose_python()
    os.setgroups([])
    os.setgid(int(sys.argv[4]))
    os.setuid(int(sys.argv[3]))
os.chdir(work_dir)

import matplotlib  # noqa: E402  (imported before the hook so its own file access is not in the way)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402
import pandas  # noqa: E402,F401
from matplotlib.axes import Axes  # noqa: E402
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


def numbers(values) -> list[float]:
    out = []
    for value in values:
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            continue
    return out


def chart_values() -> dict:
    """The current axes read per chart type as the benchmark's checker reads them (RealHiTBench, after
    TableBench: line y data, bar heights, pie wedge shares rounded to 2 places, scatter y offsets)."""
    if not plt.get_fignums():
        return {}
    ax = plt.gca()
    return {"LineChart": [v for line in ax.get_lines() for v in numbers(line.get_ydata())],
            "BarChart": numbers(p.get_height() for p in ax.patches if hasattr(p, "get_height")),
            "PieChart": [round((p.theta2 - p.theta1) / 360.0, 2) for p in ax.patches if isinstance(p, Wedge)],
            "ScatterChart": [v for c in ax.collections for v in numbers(c.get_offsets()[:, 1]) if len(c.get_offsets())]}


draw_pie = Axes.pie


def pie_of_nothing_draws_nothing(self, x, *args, **kwargs):
    """The matplotlib the users' results were scored with drew a pie whose sizes sum to zero without an error
    (today's raises "All wedge sizes are zero"): the code ran, and the chart holds no wedge."""
    try:
        empty = float(numpy.sum(numpy.asarray(x, dtype=float))) == 0
    except (TypeError, ValueError):
        empty = False
    if empty:
        return ([], [], []) if kwargs.get("autopct") else ([], [])
    return draw_pie(self, x, *args, **kwargs)


Axes.pie = pie_of_nothing_draws_nothing
shown = []
plt.show = lambda *a, **k: shown.append((plotted_values(), chart_values()))
code = open("solution.py").read()
sys.addaudithook(audit)
try:
    exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
    y, by_chart = shown[-1] if shown else (plotted_values(), chart_values())
    outcome = {"ok": True, "y": y, "by_chart": by_chart}
except BaseException as err:  # the code's failure is the result, whatever it raised
    outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
result_file.write(json.dumps(outcome))
result_file.close()
