"""Scoring reproduces the stored metrics; model-written plotting code runs only inside the sandbox."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hpc_rerun.benchmark import load_tasks
from hpc_rerun.inference.sandbox import NOBODY_UID, run_plot_code
from hpc_rerun.inference.scoring import extract_plot_code, normalise, score

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"


def stored_items():
    for path in sorted((MINI / "results").rglob("results*.json")):
        for item in json.loads(path.read_text())["results"]:
            if not item["Prediction"].startswith("[ERROR]"):
                yield path.parent.name, item


def test_scoring_reproduces_every_stored_metric():
    """All real answered items of the mini results (text metrics, ECR/Pass, GPT_EVAL placeholder)."""
    tasks = load_tasks(MINI / "QA_final_sc_filled.json")
    checked = {"text": 0, "Visualization": 0, "judge": 0}
    for config, item in stored_items():
        ours = score(tasks[item["id"]], item["Prediction"], MINI / "data")
        assert ours == item["Metrics"], (config, item["id"])
        kind = "Visualization" if "ECR" in ours else "judge" if "GPT_EVAL" in ours else "text"
        checked[kind] += 1
    assert checked["text"] > 100 and checked["Visualization"] == 10 and checked["judge"] > 10


def test_normalisation():
    assert normalise("The Total is 3.14159, an  estimate!") == "total is 31 estimate"
    assert normalise("  ") == "#"


def test_an_articles_only_answer_scores_zero_as_the_stored_metrics_have_it():
    """Choice "A" against reference "A": normalisation removes the article, the prediction becomes '#' and
    the reference stays empty, so the benchmark stores F1, EM and ROUGE-L 0 (31 such items in the users'
    tree); "B" against "B" scores 100."""
    from hpc_rerun.inference.scoring import text_metrics

    assert text_metrics("A", "A") == {"F1": 0.0, "EM": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}
    assert text_metrics("the", "A")["EM"] == 0.0
    assert text_metrics("B", "B")["F1"] == text_metrics("B", "B")["EM"] == 100.0
    assert extract_plot_code("x\n[Final Answer]: import pandas as pd\nimport pandas as pd\nplt.show()\nmore") == (
        "import pandas as pd\nplt.show()")


def chart_task(sub_type: str, reference: str):
    from hpc_rerun.benchmark import Task

    return Task(id=1, file_name="none-table01", question_type="Visualization", sub_type=sub_type,
                question="Draw it.", reference=reference)


def plot_answer(body: str) -> str:
    return f"[Final Answer]: import pandas as pd\nimport matplotlib.pyplot as plt\n{body}\nplt.show()"


@pytest.mark.parametrize("sub_type, reference, body, metrics", [
    # Shares that round to the reference but not to the reference normalised by its sum (1.01): the stored
    # results fail it, as the benchmark normalises a pie's reference first.
    ("PieChart Generation", "[0.14, 0.57, 0.3]", "plt.pie([0.136, 0.566, 0.298])", {"ECR": True, "Pass": False}),
    ("PieChart Generation", "[0.14, 0.57, 0.3]", "plt.pie([14, 56, 30])", {"ECR": True, "Pass": True}),
    # A pie whose sizes sum to zero: the users' matplotlib drew it without an error (stored ECR true).
    ("PieChart Generation", "[0.5, 0.5]", "plt.pie([0, 0])", {"ECR": True, "Pass": False}),
    # A bar chart is read by its bars: a mean line drawn over it is not a value of the chart.
    ("BarChart Generation", "[3, 1]", "plt.bar(['a', 'b'], [3, 1])\nplt.axhline(2)", {"ECR": True, "Pass": True}),
    ("LineChart Generation", "[[1, 2, 3]]", "plt.plot([3, 2, 1])", {"ECR": True, "Pass": True}),  # sorted, as theirs
    ("ScatterChart Generation", "[[5, 7]]", "plt.scatter([1, 2], [5, 7.004])", {"ECR": True, "Pass": True}),
])
def test_charts_are_compared_by_the_benchmarks_rule(sub_type, reference, body, metrics):
    assert score(chart_task(sub_type, reference), plot_answer(body), MINI / "data") == metrics


PLOT_OK = "import pandas as pd\nimport matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 1])\nplt.show()"


@pytest.mark.parametrize("name, code, error", [
    ("infinite loop", "while True:\n    pass", "time limit"),
    ("memory hog", "blocks = [bytearray(512 * 1024**2) for _ in range(16)]", "MemoryError"),
    ("write outside", "open('/tmp/hpc-rerun-escape.txt', 'w').write('x')", "not allowed"),
    ("low-level write", "import os\nos.open('/tmp/hpc-rerun-escape.txt', os.O_WRONLY | os.O_CREAT)", "not allowed"),
    ("child process", "import subprocess\nsubprocess.Popen(['sleep', '300'])", "not allowed"),
    ("fork", "import os\nif os.fork() == 0:\n    import time\n    time.sleep(300)", "not allowed"),
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 6817), timeout=2)", "not allowed"),
    ("ctypes", "import ctypes\nctypes.CDLL(None).system(b'touch /tmp/hpc-rerun-escape.txt')", "not allowed"),
])
def test_sandbox_contains_hostile_code(name, code, error):
    started = time.time()
    run = run_plot_code(code, None, "x")
    assert not run.ok and error in run.error, run
    assert time.time() - started < 20, "the 15 s limit holds"
    assert not os.path.exists("/tmp/hpc-rerun-escape.txt")
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _started_by_the_sandbox(p)]
    assert leftovers == [], "nothing it started is left running"


def _started_by_the_sandbox(pid: str) -> bool:
    """A ``sleep 300`` of the code's user (nobody when the tests run as root; else ours, and only ours to see):
    a machine-wide search also finds anyone's own ``sleep 300``."""
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    code_user = NOBODY_UID if os.geteuid() == 0 else os.geteuid()
    return cmdline.startswith("sleep 300") and owner == code_user


def test_sandbox_runs_honest_plotting_code_and_reads_the_chart(tmp_path):
    run = run_plot_code(PLOT_OK, None, "x")
    assert run.ok and sorted(run.y_values) == [1.0, 3.0]


def test_sandbox_reads_the_table_and_cannot_change_it():
    xlsx = MINI / "data" / "tables" / "society-table10.xlsx"
    before = xlsx.read_bytes()
    code = ("import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_excel('table.xlsx')\n"
            "open('table.xlsx', 'wb').write(b'')\nplt.plot([len(df)])\nplt.show()")
    run = run_plot_code(code, xlsx, "society-table10")
    assert run.ok and run.y_values[0] > 0, run
    assert xlsx.read_bytes() == before, "the sandbox works on a copy"


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero_score(monkeypatch):
    import hpc_rerun.inference.sandbox as sandbox

    sandbox.check_sandbox.cache_clear()
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python3")
    try:
        with pytest.raises(RuntimeError, match="the plotting sandbox cannot run here"):
            run_plot_code(PLOT_OK, None, "x")
    finally:
        sandbox.check_sandbox.cache_clear()


PLOT_FROM_THE_TABLE = """import os
import pandas as pd
import matplotlib.pyplot as plt
assert os.getuid() == 65534, "runs as nobody"
df = pd.read_excel('table.xlsx')
plt.figure(figsize=(6, 4))
plt.bar(['a', 'b', 'c'], [1.5, 2.25, 3])
plt.title('Employment by sector $x^2$'); plt.xlabel('sector'); plt.ylabel('persons'); plt.legend(['2020'])
plt.tight_layout()
plt.savefig('chart.png')
plt.show()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox becomes nobody only when it runs as root")
def test_the_sandbox_works_from_a_clone_in_a_private_home(tmp_path):
    """root's home is 0700, so a clone there keeps its venv and package out of nobody's reach. Built here as
    a venv in a 0700 folder whose packages link to ours (nobody cannot follow links out of that folder)."""
    import subprocess
    import sys
    import sysconfig

    home = tmp_path / "root-home"
    home.mkdir(mode=0o700)
    venv = home / "clone" / ".venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("__editable__", "hpc_rerun")):
            (site / entry.name).symlink_to(entry)
    (site / "hpc_rerun").symlink_to(Path(__file__).resolve().parent.parent / "hpc_rerun")
    unreachable = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-r",
                                  str(site / "pandas" / "__init__.py")])
    assert unreachable.returncode != 0, "the set-up must really hide the packages from nobody"
    xlsx = MINI / "data" / "tables" / "employment-table01.xlsx"
    probe = ("import json, sys; from pathlib import Path; from hpc_rerun.inference.sandbox import run_plot_code; "
             "run = run_plot_code(sys.stdin.read(), Path(sys.argv[1]), 'employment-table01'); "
             "print(json.dumps([run.ok, run.y_values, run.error]))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe, str(xlsx)], input=PLOT_FROM_THE_TABLE,
                         capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [True, [1.5, 2.25, 3.0], None]
