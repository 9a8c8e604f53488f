"""Visualization ECR / Pass as the users' own scripts decide them (their fork's inference scripts with
utils/chart_process.py and utils/chart_metric_util.py), case by case where it differs from plain Python.

Every case is task 1960 of the mini tree (society-table10, "LineChart Generation", reference
[[12850, 12565, 19432, 9614]]) answered in the model's own style: the stored text_json answer below scores
ECR true / Pass true in the users' file; each case changes it the way real answers differ. The code runs in
the real sandbox against the real table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_rerun.benchmark import Task, load_tasks
from hpc_rerun.scoring.charts import benchmark_program, extract_plot_code, point_at_table
from hpc_rerun.scoring.metrics import in_convention, not_run_pass, score

from .conftest import MINI_DATA

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
HEAD = "import pandas as pd \n import matplotlib.pyplot as plt \n"  # the prompt's answer format, as answers copy it
LOAD = ("df = pd.read_excel('table.xlsx')\n"
        "data = df[df['Diagnostic group'] == 'Congenital anomalies']\n"
        "age_groups = ['Under 3', '3–5', '6–12', '13–17']\n")
PLOT = ("plt.plot(age_groups, values, marker='o')\n"
        "plt.title('Trend of Children Receiving SSI Payments for Congenital Anomalies by Age Group')\n"
        "plt.xlabel('Age Group')\nplt.ylabel('Number of Recipients')\nplt.xticks(rotation=45)\nplt.grid(True)\n"
        "plt.tight_layout()\nplt.show()")
VALUES = "values = data[age_groups].iloc[0].astype(float)\n"


def stored_answer() -> dict:
    data = json.loads((MINI / "results/complied/qwen3vl_text/text_json/results.json").read_text())
    return next(item for item in data["results"] if item["id"] == 1960)


def task_1960() -> Task:
    return load_tasks(MINI / "QA_final_sc_filled.json")[1960]


def test_the_stored_answer_is_the_baseline_every_case_changes():
    item = stored_answer()
    assert item["Prediction"] == HEAD + LOAD + VALUES + PLOT
    assert item["Metrics"] == {"ECR": True, "Pass": True}
    assert score(task_1960(), item["Prediction"], MINI_DATA) == item["Metrics"]


@pytest.mark.parametrize("case, answer, metrics", [
    # Their build_eval_code strips every line, then indents all of them under `if __name__ == '__main__':`:
    # a loop's body loses its indentation and the program does not compile. Python runs it.
    ("indented block", HEAD + LOAD + VALUES + "for i, v in enumerate(values):\n    plt.annotate(str(v), (i, v))\n"
     + PLOT, {"ECR": False, "Pass": "None"}),
    # exec(c) inside their execute(): the code's names live in a locals dict a comprehension cannot see.
    ("comprehension", HEAD + LOAD + "values = [float(data[g].iloc[0]) for g in age_groups]\n" + PLOT,
     {"ECR": False, "Pass": "None"}),
    ("lambda", HEAD + LOAD + "values = data[age_groups].iloc[0].apply(lambda v: pd.to_numeric(v))\n" + PLOT,
     {"ECR": False, "Pass": "None"}),
    # The whole last block from `import pandas as pd` to the first `plt.show()`: here it starts in the
    # answer's first, unfinished snippet, so the program holds the prose and the fences between them.
    ("block from the first import", "import pandas as pd\ndf = pd.read_excel('table.xlsx')\n```\nNow the chart:\n"
     "```python\n" + HEAD + LOAD + VALUES + PLOT, {"ECR": False, "Pass": "None"}),
    # No pandas block: their second pattern, `import matplotlib.pyplot as plt ... plt.show()`, runs.
    ("pyplot block", "import matplotlib.pyplot as plt\nplt.plot(['Under 3', '3–5', '6–12', '13–17'], "
     "[12850, 12565, 19432, 9614])\nplt.show()", {"ECR": True, "Pass": True}),
    # Every quoted '....xlsx' is pointed at the task's table before the code runs.
    ("other file name", HEAD + LOAD.replace("table.xlsx", "/mnt/data/ssi_recipients.xlsx") + VALUES + PLOT,
     {"ECR": True, "Pass": True}),
    # The block starts at `import pandas as pd`, after the pyplot import: `plt` is their script's own global.
    ("plt from their script", "import matplotlib.pyplot as plt\nimport pandas as pd\n" + LOAD + VALUES + PLOT,
     {"ECR": True, "Pass": True}),
    # Their second run reads stdout: what the code prints stands before the values, which no longer parse.
    ("code that prints", HEAD + LOAD + VALUES + "print(values)\n" + PLOT, {"ECR": True, "Pass": "False"}),
    # The y data is printed as it is: numbers held as text parse to strings, which cannot be rounded.
    ("values as text", HEAD + LOAD + "values = data[age_groups].iloc[0].astype(int).astype(str)\n" + PLOT,
     {"ECR": True, "Pass": "False"}),
])
def test_the_users_rule_decides_ecr_and_pass(case, answer, metrics):
    assert score(task_1960(), answer, MINI_DATA) == metrics, case


def test_a_pie_whose_axes_hold_another_patch_prints_nothing():
    """Their pie getter reads theta1/theta2 of every patch of the axes: a circle added as a patch (a donut)
    raises, so their second run prints nothing (Pass 'None'), though the wedges are right."""
    task = Task(id=1, file_name="society-table10", question_type="Visualization", sub_type="PieChart Generation",
                question="Draw it.", reference="[30, 50, 20]")
    pie = HEAD + "plt.pie([30, 50, 20])\n"
    assert score(task, pie + "plt.show()", MINI_DATA) == {"ECR": True, "Pass": True}
    donut = pie + "plt.gca().add_patch(plt.Circle((0, 0), 0.6, color='white'))\nplt.show()"
    assert score(task, donut, MINI_DATA) == {"ECR": True, "Pass": "None"}


def test_the_program_their_first_run_executes():
    code = "import pandas as pd \n import matplotlib.pyplot as plt \nif True:\n    x = 1\nplt.show()"
    answer = f"Answer:\n```python\n{code}\n```\nimport pandas as pd"
    assert extract_plot_code(answer) == code
    assert benchmark_program(extract_plot_code(answer)) == (
        "\nif __name__ == '__main__':\n    import pandas as pd\n    import matplotlib.pyplot as plt\n    if True:\n"
        "    x = 1\n    plt.show()\n")
    assert point_at_table("pd.read_excel('a.xlsx'); pd.read_excel(\"b.xlsx\"); f(table.xlsx)", "/t/x.xlsx") == (
        "pd.read_excel('/t/x.xlsx'); pd.read_excel(\"/t/x.xlsx\"); f(/t/x.xlsx)")
    assert point_at_table("pd.read_excel('x.xlsx')", "/work/table.xlsx") == "pd.read_excel('/work/table.xlsx')"


def test_a_file_of_their_batch_loops_stores_false_where_the_sequential_loops_store_strings():
    """'None' (nothing compared) and 'False' (not comparable) are the sequential loops'; a file whose not-run
    items store False (batch loops, recompute script) stores False for both, and keeps True/False."""
    batch_file = [{"Metrics": {"ECR": False, "Pass": False}}]
    assert not_run_pass(batch_file) is False
    for stored in ("None", "False", False):
        assert in_convention({"ECR": True, "Pass": stored}, False) == {"ECR": True, "Pass": False}
    assert in_convention({"ECR": True, "Pass": True}, False) == {"ECR": True, "Pass": True}
    assert in_convention({"ECR": True, "Pass": "False"}, "None") == {"ECR": True, "Pass": "False"}
