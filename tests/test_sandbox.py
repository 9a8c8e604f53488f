"""The sandbox runs honest plotting code as before, in the strongest layer that exists, and says which.
(What it holds against hostile code: test_sandbox_hostile.py.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hpc_rerun.benchmark import Task
from hpc_rerun.scoring.charts import chart_pass
from hpc_rerun.scoring.metrics import score_answer
from hpc_rerun.scoring.sandbox import Sandbox, SandboxUnavailable, run_plot_code

from .conftest import MINI_DATA

TABLE = MINI_DATA / "tables" / "employment-table01.xlsx"
BARS = "import pandas as pd\nimport matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 1])\nplt.show()"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed "
                                 "(scripts/install.sh installs it; CI has it)")


@needs_bwrap
def test_honest_code_runs_under_bubblewrap_and_its_chart_is_read():
    run = run_plot_code(BARS, None, "x")
    assert run.ok and run.layer == "bubblewrap", run
    assert chart_pass("BarChart Generation", "[3, 1]", run.reading) is True


def test_the_code_reads_its_table_under_both_names_and_cannot_change_the_original():
    before = TABLE.read_bytes()
    code = ("import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_excel('table.xlsx')\n"
            "same = pd.read_excel('employment-table01.xlsx').equals(df)\nopen('table.xlsx', 'wb').write(b'')\n"
            "plt.plot([len(df), int(same)])\nplt.show()")
    run = run_plot_code(code, TABLE, "employment-table01")
    assert run.ok, run
    rows = len(__import__("pandas").read_excel(TABLE))
    assert chart_pass("LineChart Generation", f"[[{rows}, 1]]", run.reading) is True
    assert TABLE.read_bytes() == before, "the sandbox works on a copy"


@needs_bwrap
def test_a_visualization_item_records_the_layer_and_why_its_code_did_not_run():
    task = Task(id=1, file_name="employment-table01", question_type="Visualization", sub_type="BarChart Generation",
                question="Draw it.", reference="[3, 1]")
    honest = score_answer(task, f"[Final Answer]: {BARS}", MINI_DATA)
    assert honest.metrics == {"ECR": True, "Pass": True} and honest.sandbox_layer == "bubblewrap"
    looping = score_answer(task, "import pandas as pd\nimport matplotlib.pyplot as plt\nwhile True: pass\n"
                           "plt.show()", MINI_DATA)
    assert looping.metrics == {"ECR": False, "Pass": "None"}
    assert looping.sandbox_layer == "bubblewrap" and "time limit of 15 s" in looping.note


def test_without_bubblewrap_the_weaker_layer_runs_says_so_once_and_is_recorded(monkeypatch, tmp_path, caplog):
    """A node without bwrap (or without user namespaces): the 'process' layer scores the same honest code, the
    first use warns once, each run says which layer it had."""
    monkeypatch.setenv("PATH", str(tmp_path))  # where no bwrap is
    sandbox = Sandbox()
    try:
        with caplog.at_level(logging.WARNING, logger="hpc_rerun.scoring.sandbox"):
            runs = [sandbox.get().run(BARS, None, "x", 15) for _ in range(2)]
        assert [r.layer for r in runs] == ["process", "process"]
        assert all(r.ok and chart_pass("BarChart Generation", "[3, 1]", r.reading) is True for r in runs), runs
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "weaker 'process' sandbox layer" in warnings[0]
        assert "bubblewrap (bwrap) is not installed" in warnings[0]
        timed_out = sandbox.get().run("while True: pass", None, "x", 2)
        assert not timed_out.ok and "time limit of 2 s" in timed_out.error
    finally:
        sandbox.close()


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero_score(monkeypatch):
    import hpc_rerun.scoring.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module.sys, "executable", "/nonexistent/python3")
    sandbox = Sandbox()
    with pytest.raises(SandboxUnavailable, match="the plotting sandbox cannot run here"):
        sandbox.get()


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


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="a clone in a private home of another user: made as root")
def test_the_sandbox_works_from_a_clone_in_a_private_home(tmp_path):
    """root's home is 0700: a clone there keeps its venv and packages out of everyone else's reach. Built here as
    a venv in a 0700 folder under /tmp (which each run gets a private tmpfs over) whose packages link to ours."""
    home = tmp_path / "root-home"
    home.mkdir(mode=0o700)
    venv = home / "clone" / ".venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("__editable__", "hpc_rerun")):
            (site / entry.name).symlink_to(entry)
    (site / "hpc_rerun").symlink_to(Path(__file__).resolve().parent.parent / "hpc_rerun")
    xlsx = MINI_DATA / "tables" / "employment-table01.xlsx"
    probe = ("import json, sys; from pathlib import Path; from hpc_rerun.scoring.sandbox import run_plot_code; "
             "from hpc_rerun.scoring.charts import chart_pass; "
             "run = run_plot_code(sys.stdin.read(), Path(sys.argv[1]), 'employment-table01'); "
             "print(json.dumps([run.ok, run.layer, run.error, run.ok and chart_pass('BarChart', '[1.5, 2.25, 3]', "
             "run.reading)]))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe, str(xlsx)], input=PLOT_FROM_THE_TABLE,
                         capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [True, "bubblewrap", None, True]
