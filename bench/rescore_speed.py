"""rescore of a 2,000-answer Visualization tree: the sandbox's fork server against a fresh interpreter per answer.

    .venv/bin/python bench/rescore_speed.py [--answers 2000] [--jobs 2] [--old-sample 40]

Builds a tree from the mini fixture's real Visualization answers (its five result files, each keeping only its
Visualization items, repeated under new ids up to --answers in all: real tasks,
tables, answers and stored ECR/Pass), then, in one run:
- new: ``hpc_rerun.rescore.rescore`` of the whole tree (fork server, per-run namespaces; checks that every
  stored ECR/Pass comes back);
- old: what the sandbox did before per answer, a fresh ``python -I`` that imports pandas and matplotlib
  and runs the answer beside its table, on a sample of --old-sample answers with the same number of
  threads, extrapolated to the tree (running it on all 2,000 takes most of an hour).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hpc_rerun.rescore import rescore
from hpc_rerun.scoring.charts import sandbox_program
from hpc_rerun.scoring.sandbox import CHARTS, SANDBOX

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' mini data root
from tests.conftest import MINI  # noqa: E402
from tests.conftest import MINI_DATA as DATA

FRESH_INTERPRETER = """import sys
sys.path.insert(0, sys.argv[1])
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt, pandas, openpyxl
exec(compile(open('solution.py').read(), 'solution.py', 'exec'), {'__name__': '__main__'})
"""


def build_tree(root: Path, answers: int) -> list[dict]:
    """The mini tree's result files with only their Visualization answers, repeated to ``answers`` in all."""
    sources = sorted((MINI / "results" / "complied").rglob("results*.json"))
    per_file = answers // len(sources)
    items = []
    for source in sources:
        data = json.loads(source.read_text())
        charts = [i for i in data["results"] if i.get("QuestionType") == "Visualization"
                  and not i["Prediction"].startswith("[ERROR]")]
        data["results"] = [dict(charts[n % len(charts)], id=100_000 + n) for n in range(per_file)]
        items += data["results"]
        target = root / source.relative_to(MINI / "results" / "complied")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2))
    return items


def run_fresh(item: dict) -> float:
    """One answer the old way: a new interpreter, pandas and matplotlib imported, the code run."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        table = DATA / "tables" / f"{item['FileName']}.xlsx"
        for name in ("table.xlsx", table.name):
            shutil.copy(table, Path(work) / name)
        (Path(work) / "solution.py").write_text(sandbox_program(item["Prediction"]))
        subprocess.run([sys.executable, "-I", "-c", FRESH_INTERPRETER, str(CHARTS.parent)], cwd=work,
                       capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg",
                                                             "MPLCONFIGDIR": work, "HOME": work})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--old-sample", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "results"
        items = build_tree(tree, args.answers)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(run_fresh, items[: args.old_sample]))
        old_each = (time.perf_counter() - started) / args.old_sample
        print(f"old: {args.old_sample} answers, {old_each:.2f} s per answer with {args.jobs} threads", flush=True)

        done = [0]

        def progress(n: int) -> None:
            done[0] += n
            if done[0] % 250 == 0:
                print(f"new: {done[0]}/{len(items)} answers, {time.perf_counter() - started:.0f} s", flush=True)

        started = time.perf_counter()
        reports = rescore(tree, DATA, jobs=args.jobs, progress=progress)
        new_total = time.perf_counter() - started
        SANDBOX.close()
    scored = sum(r.items for r in reports)
    differ = sum(r.changed_items for r in reports)
    layers = {layer for r in reports for layer in r.sandbox_layers}
    old_total = old_each * len(items)
    print("\n| answers | jobs | old (fresh interpreter, extrapolated) | new (fork server) | speed-up | differ |")
    print("|---|---|---|---|---|---|")
    print(f"| {scored} | {args.jobs} | {old_total / 60:.1f} min ({old_each:.2f} s/answer) | "
          f"{new_total / 60:.1f} min ({new_total / scored:.3f} s/answer, {'/'.join(sorted(layers))}) | "
          f"{old_total / new_total:.1f}x | {differ} |")
    if differ:
        sys.exit(f"{differ} stored ECR/Pass not reproduced")


if __name__ == "__main__":
    main()
