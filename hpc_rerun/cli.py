"""The `hpc-rerun` command line: one subcommand per step of the flow.

Each command turns its flags into the option groups of options.py, calls the one step that owns the work
(scan, plan, backends, status, resubmit, merge, rescore, derived, pipeline), and prints with views.py.
Errors of any step become one line on stderr and an exit code (``handles_errors``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress

from . import __version__
from .backends import AlreadySubmitted, BackendUnavailable, SubmitOptions, backend, cancel_all, choose, submit_attempt
from .backends.slurm import SlurmOptions
from .benchmark import DEFAULT_TASK_LIST, BenchmarkError
from .demo import run_demo
from .inference.tinymodel import build_tiny_qwen3vl
from .merge import MergeLocked, merge_run
from .options import PlanChoices, ScanInputs, SlurmChoices, UsageProblem, parse_run_dir
from .pipeline import run_pipeline
from .plan import plan_shards, write_run
from .report import regenerate
from .rescore import rescore as rescore_tree
from .resubmit import resubmit as resubmit_run
from .rundir import NotARunDir, RunDir, RunDirError
from .scan import rescan_after_merge, write_skip_reports
from .status import status_round, to_json
from .views import print_merge, print_plan, print_scan, print_status, report_lines, rescore_lines

HELP = """Finish a large VLM evaluation on a Slurm cluster.

\b
The flow: scan (what is missing, and why) -> plan (cost-balanced shards) -> submit (one Slurm job
array) -> status / resubmit -> merge-shards (answers back into the result files, atomically).
The commands this version has are listed below; `hpc-rerun COMMAND --help` explains each.

\b
Exit codes: 0 success, 1 a check failed (e.g. runnable gaps with --fail-on-gaps),
2 bad usage, 3 an input could not be read (named on stderr).
"""

EXIT_GAPS = 1
EXIT_BAD_INPUT = 3
DEV_CLUSTER_PROFILE = Path(__file__).resolve().parent / "profiles" / "dev-cluster.toml"  # in the package


def handles_errors(command):
    """A step's error as one line and an exit code: bad usage 2 (click's), unreadable input or an unusable
    executor 3."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UsageProblem, AlreadySubmitted) as err:
            raise click.UsageError(str(err)) from None
        except (BenchmarkError, NotARunDir, RunDirError, BackendUnavailable, MergeLocked) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def option_group(name: str, cls, options: list):
    """Declare ``options`` on a command and hand them to it as one ``cls`` instance named ``name``."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(**kwargs):
            fields = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)}
            return command(**{name: cls(**fields)}, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


scan_inputs = option_group("inputs", ScanInputs, [
    click.argument("results_root", required=False, type=click.Path(path_type=Path)),
    click.option("--data-root", type=click.Path(path_type=Path),
                 help="Benchmark data folder (latex/, html/, csv/, markdown/, json/, image/, tables/)."),
    click.option("--tasks", "task_list", type=click.Path(path_type=Path),
                 help=f"Task list; default: {DEFAULT_TASK_LIST} in or beside the data root."),
    click.option("--project", "project_file", type=click.Path(path_type=Path),
                 help="Project file (TOML) with results_root, data_root, tasks, [variants], [configs], [runs], "
                      "[protocols]."),
    click.option("--run-dir", "run_dirs", multiple=True, metavar="DIR[=CONFIG]",
                 help="A run directory (results_*.json, checkpoint.json) whose answers count too."),
    click.option("--config", "only", multiple=True, metavar="NAME", help="Only this configuration (repeatable)."),
])

plan_choices = option_group("choices", PlanChoices, [
    click.option("--model", required=True, help="Model folder (from_pretrained), e.g. /models/Qwen3-VL-8B-Instruct."),
    click.option("--shards", type=int, help="Number of shards (array elements)."),
    click.option("--gpus", type=int, help="Same as --shards: one shard per GPU you will get."),
    click.option("--target-hours", type=float, help="Shards sized to about this many GPU hours each [default: 1]."),
    click.option("--prompts", type=click.Path(file_okay=False, path_type=Path),
                 help="Your benchmark checkout (inference/answer_prompt_*.py); default: hpc-rerun's own prompts."),
    click.option("--greedy", is_flag=True,
                 help="Greedy decoding (default: the users' sampling: T 0.7, top-p 0.8, top-k 20)."),
    click.option("--max-new-tokens", type=int, default=4096, show_default=True),
    click.option("--token-budget", type=int,
                 help="Prompt tokens per task before truncation [default: from the GPU's memory]."),
    click.option("--max-input-tokens", type=int, metavar="N",
                 help="The users' truncation rule instead of ours: cut the table when the chat-templated text message "
                      "(image not counted) has more than N tokens, by their line steps (their OOM reruns: 200000)."),
    click.option("--logs", type=click.Path(file_okay=False, path_type=Path), default=Path("logs"), show_default=True,
                 help="Where run directories are created."),
])

def slurm_flags(command):
    """``--profile`` and one flag per ``SlurmOptions`` field that has one (its metadata: flag, help), handed to
    the command as ``slurm``: SlurmChoices."""
    declared = [f for f in dataclasses.fields(SlurmOptions) if f.metadata["flag"]]

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = {f.name: kwargs.pop(f.name) for f in declared}
        return command(slurm=SlurmChoices(kwargs.pop("profile"), flags), **kwargs)

    for f in reversed(declared):
        repeatable = f.metadata["repeatable"]
        kind = int if "int" in str(f.type) else str
        metavar = ("KEY=VALUE" if f.name == "extra_sbatch" else "LINE") if repeatable else None
        wrapper = click.option(f.metadata["flag"], f.name, type=kind, multiple=repeatable, help=f.metadata["help"],
                               metavar=metavar)(wrapper)
    return click.option("--profile", type=click.Path(dir_okay=False, path_type=Path),
                        help="Site profile (TOML): partition, gres, time, memory, setup lines; see slurm/profiles/."
                        )(wrapper)


json_flag = click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
parallel_flag = click.option("--parallel", type=int, default=1, show_default=True,
                             help="local: CPU workers at once when no GPU.")
run_dir_argument = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))


def echo_problems(warnings: list[str | None], problems: list[str]) -> None:
    """Warnings (e.g. aggregates left as they were) and errors on stderr; exit 3 if an input could not be used."""
    for warning in filter(None, warnings):
        click.echo(f"warning: {warning}", err=True)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_BAD_INPUT)


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hpc-rerun")
def main() -> None:
    pass


@main.command("build-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
@click.option("--answer", help="Set the weights so it always replies this text (e.g. '[Final Answer]: Yes').")
def build_tiny_model(out_dir: Path, seed: int, answer: str | None) -> None:
    """Write a tiny random Qwen3-VL (real architecture and processor, ~1 MB) to OUT_DIR.

    It loads with Qwen3VLForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained,
    exactly like Qwen3-VL-8B-Instruct, and needs no model hub. Tests and the demo use it.
    """
    click.echo(f"tiny Qwen3-VL written to {build_tiny_qwen3vl(out_dir, seed=seed, answer=answer)}")


@main.command()
@scan_inputs
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON (ids included).")
@click.option("--write-reports", is_flag=True, help="Write skip_ids.json beside each configuration's result file.")
@click.option("--fail-on-gaps", is_flag=True, help=f"Exit {EXIT_GAPS} when any configuration has runnable gaps.")
@handles_errors
def scan(inputs: ScanInputs, as_json, write_reports, fail_on_gaps):
    """Find every missing or failed task per configuration under RESULTS_ROOT.

    RESULTS_ROOT is the compiled tree <variant>/<modality>[_<format>]/results*.json. Each task is
    success, error (oom_text, oom_image, missing_input, format_failure, ...), absent, or unrunnable
    (a source file it needs does not exist). Runnable = absent or failed, with every file present.

    \b
    Examples:
      hpc-rerun scan result/complied --data-root data
      hpc-rerun scan result/complied --data-root data --run-dir result/rerun-text_html --json
      hpc-rerun scan --project hpc-rerun.toml --write-reports --fail-on-gaps
    """
    project, report = inputs.scan()
    written = write_skip_reports(report) if write_reports else []
    if as_json:
        out = report.to_json()
        out["variants"] = {v: dataclasses.asdict(project.variant(v))
                           for v in sorted({c.config.variant for c in report.configs})}
        click.echo(json.dumps(out, indent=2))
    else:
        print_scan(report, written)
    echo_problems([], report.problems)
    if fail_on_gaps and any(c.runnable for c in report.configs):
        sys.exit(EXIT_GAPS)


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Log each failed task and retry.")
def worker(spec, verbose):
    """Run one shard (SPEC = <run>/attempt-N/shard-NNNN.json) on this machine.

    Loads the model once, answers every task not yet in the shard file (SPEC with .jsonl), and appends
    one record per task. Safe to rerun: it resumes where the file ends. This is what each Slurm array
    element runs. Generation settings are the spec's (set by `plan`), so every attempt uses the same.
    """
    from .inference.worker import run_shard  # torch and transformers: only the worker pays for them

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    click.echo(json.dumps(run_shard(spec)))


@main.command()
@scan_inputs
@plan_choices
@click.option("--run-id", help="Name of the run directory [default: date-time-random].")
@click.option("--dry-run", is_flag=True, help="Print the shards and sbatch options; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@slurm_flags
@handles_errors
def plan(inputs: ScanInputs, choices: PlanChoices, slurm: SlurmChoices, run_id, dry_run, as_json):
    """Turn the runnable gaps into cost-balanced shards and a run directory logs/<run-id>/.

    Scans first (same inputs as `scan`), estimates each runnable task's GPU seconds on this engine
    (prompt tokens from the model's tokenizer, truncated to the model's context; visual tokens from the
    image size and the pixel limits; the expected answer length; rates measured on an H200), prints the
    estimated GPU hours and wall time, and packs tasks of all configurations into shards, longest
    first. Then `hpc-rerun submit logs/<run-id>`.
    """
    options = slurm.resolve()
    project, report = inputs.scan()
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    settings = choices.settings(project)
    planned = plan_shards(report, project.variant, settings, choices.n_shards, choices.target_hours)
    if planned is None:
        click.echo("nothing to rerun: no configuration has runnable gaps")
        sys.exit(EXIT_BAD_INPUT if report.problems else 0)
    run = None if dry_run else write_run(choices.logs, report, planned.shards, settings, project.variant,
                                         options.to_dict(), run_id)
    run_path = run.path if run else choices.logs / "<run-id>"
    outline = {"run_dir": str(run.path) if run else None, **planned.outline(),
               "sbatch": options.sbatch_lines(run_path.name, len(planned.shards), run_path / "submitit")}
    if as_json:
        click.echo(json.dumps(outline, indent=2))
    else:
        print_plan(outline, dry_run)


@main.command()
@run_dir_argument
@click.option("--executor", type=click.Choice(["slurm", "local"]), default="slurm", show_default=True,
              help="slurm: one job array through submitit; local: processes on this machine, one per GPU.")
@parallel_flag
@click.option("--attempt", "number", type=int, help="Which attempt to submit [default: the latest].")
@slurm_flags
@handles_errors
def submit(run_dir, executor, parallel, number, slurm: SlurmChoices):
    """Submit a planned run: one Slurm job array (each element one shard on its own GPU), or --executor local.

    Returns at once with the job id; watch with `hpc-rerun status RUN_DIR --watch`.
    """
    run = RunDir.open(run_dir)
    plan = run.plan()
    if number is not None and not 1 <= number <= len(plan.attempts):
        raise UsageProblem(f"{run_dir}: no attempt {number} (it has {len(plan.attempts)})")
    attempt = plan.attempts[(number or len(plan.attempts)) - 1]
    options = SubmitOptions(slurm=slurm.resolve(attempt.slurm or plan.slurm), parallel=parallel)
    click.echo(f"attempt {attempt.number}: {submit_attempt(attempt, executor, options)}")
    click.echo(f"watch: hpc-rerun status {run_dir} --watch")


@main.command()
@run_dir_argument
@click.option("--watch", is_flag=True, help="Refresh until every shard has ended (back-off up to 60 s).")
@click.option("--interval", type=float, default=5, show_default=True, help="First refresh interval (s).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handles_errors
def status(run_dir, watch, interval, as_json):
    """Progress of a run: per shard the scheduler state and done/total; totals, rate, ETA.

    States come from sacct cross-checked with squeue (LOST: gone from both after a grace period);
    done/total from the shard files. Exit 0 when finished with nothing left to rerun, 1 otherwise.
    """
    run = RunDir.open(run_dir)
    while True:
        status = status_round(run)
        totals = status.totals
        if as_json:
            click.echo(json.dumps(to_json(status), indent=2))
        else:
            print_status(run_dir, status.shards, totals)
        if not watch or totals["finished"]:
            break
        time.sleep(interval)
        interval = min(interval * 1.5, 60)
    if not totals["finished"] or totals["needs_rerun"]:
        sys.exit(EXIT_GAPS)


@main.command()
@run_dir_argument
@click.option("--retry-errors", is_flag=True,
              help="Also rerun tasks whose answer is a retryable error (OOM with half the budget/pixels, format).")
@click.option("--partition", help="Send the new attempt to another partition.")
@click.option("--shards", type=int, help="Number of shards for the new attempt.")
@parallel_flag
@click.option("--no-submit", is_flag=True, help="Write the new attempt but do not submit it.")
@handles_errors
def resubmit(run_dir, retry_errors, partition, shards, parallel, no_submit):
    """Rerun only what is still missing from shards that ended, as a new attempt, with escalation.

    Shards that are pending or running are never touched. After TIMEOUT or a lost element: twice the
    time and smaller shards; after OUT_OF_MEMORY: more memory. Submits the way the run was submitted.
    """
    try:
        attempt, entries, line = resubmit_run(RunDir.open(run_dir), parallel, retry_errors, partition, shards,
                                              not no_submit)
    except BackendUnavailable as err:
        click.echo(f"error: {err}\nthe new attempt is written; submit it with `hpc-rerun submit {run_dir}` "
                   "where Slurm is, or `--executor local`", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if attempt is None:
        click.echo("nothing to resubmit: no ended shard has missing tasks")
        return
    click.echo(f"attempt {attempt.number}: {len(entries)} tasks from shards that ended "
               f"({', '.join(attempt.causes or ['-'])})")
    if line:
        click.echo(line)


@main.command()
@run_dir_argument
@handles_errors
def cancel(run_dir):
    """Stop every job of a run (scancel for Slurm, the local pool otherwise). Shard files are kept."""
    cancelled = cancel_all(RunDir.open(run_dir).attempts())
    click.echo(f"cancelled: {', '.join(cancelled)}" if cancelled else "nothing to cancel")


@main.command("run")
@scan_inputs
@plan_choices
@click.option("--executor", type=click.Choice(["auto", "slurm", "local"]), default="auto", show_default=True,
              help="auto: Slurm if srun is on PATH, else this machine (it says which).")
@click.option("--max-attempts", type=int, default=3, show_default=True,
              help="Attempts in all: failed or lost shards are resubmitted until then.")
@parallel_flag
@slurm_flags
@handles_errors
def run_command(inputs: ScanInputs, choices: PlanChoices, slurm: SlurmChoices, executor, max_attempts, parallel):
    """All of it in one command: scan, plan, submit, live progress, resubmit, merge, scan again.

    Ctrl-C leaves the jobs running and prints how to reattach (status, merge-shards).
    Exit 0 when no runnable gap is left, 1 when some are, 3 when an input could not be read.
    """
    console = Console()
    options = SubmitOptions(slurm=slurm.resolve(), parallel=parallel)
    project, report = inputs.scan()
    print_scan(report, console=console)
    executor, why = choose(executor)
    console.print(f"executor: {executor} ({why}; choose with --executor slurm|local)", highlight=False)
    backend(executor).check()
    try:
        run_dir = run_pipeline(report, project.variant, choices.settings(project), logs=choices.logs, executor=executor,
                               options=options, shards=choices.n_shards, target_hours=choices.target_hours,
                               max_attempts=max_attempts, console=console)
    except KeyboardInterrupt:
        sys.exit(130)
    if run_dir is not None:
        _, report = inputs.scan()
        console.print("after the rerun:")
        print_scan(report, console=console)
    if report.problems:
        sys.exit(EXIT_BAD_INPUT)
    if any(c.runnable for c in report.configs):
        sys.exit(EXIT_GAPS)


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path),
                default=Path("hpc-rerun-demo"))
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: this machine; slurm: the dev cluster (sudo slurm/dev-cluster start) or your own.")
@handles_errors
def demo(directory, executor):
    """The whole pipeline on a bundled mini benchmark with a tiny model, on any laptop (about a minute).

    Writes DIRECTORY: 3 real RealHiTBench tables in every format (images rendered here), 17 tasks of
    every question type, a result tree in all three layouts with every kind of gap, and a tiny Qwen3-VL
    whose weights are set to always answer '[Final Answer]: Yes'. Then it runs `hpc-rerun run` on it
    and shows the scan before and after.
    """
    if run_demo(directory, executor, DEV_CLUSTER_PROFILE, Console()):
        sys.exit(EXIT_GAPS)


@main.command("merge-shards")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--into", "results_root", type=click.Path(file_okay=False, path_type=Path),
              help="Results root to merge into (default: the one the run was planned from).")
@click.option("--from", "sources", multiple=True, metavar="DIR[=CONFIG]",
              help="Also merge a run directory of your own (results_*.json, checkpoint.json).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Data root, for the scan afterwards.")
@click.option("--tasks", "task_list", type=click.Path(path_type=Path), help="Task list, for the scan afterwards.")
@click.option("--overwrite", is_flag=True, help="Also replace existing successes with new successes.")
@click.option("--force", is_flag=True, help="Merge into files that changed since the run was planned.")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@click.option("--no-provenance", is_flag=True, help="Leave the provenance object out of merged items.")
@click.option("--recompute-aggregates", is_flag=True,
              help="Rewrite aggregate_metrics even where no rule gives the stored values back from the items.")
@json_flag
@handles_errors
def merge_shards(run_dir, results_root, sources, data_root, task_list, overwrite, force, dry_run, no_provenance,
                 recompute_aggregates, as_json):
    """Merge the answers of RUN_DIR's shards (and/or --from run directories) into the result files.

    Per task the best answer wins (success over error, newer attempt over older). [ERROR] items are
    replaced, absent ids inserted, existing successes kept (unless --overwrite). Each file keeps its
    layout, is written atomically with a backup beside it (results.json.bak-<time>), and its
    aggregate_metrics, checkpoint.json and skip_ids.json are refreshed. Aggregates follow the file's own
    rule (percent or fraction per level, Pass over all or over ECR-true items), found from its stored
    values; groups whose items did not change keep their numbers exactly; a file whose stored values no
    rule gives back keeps its aggregates (a warning says which disagree). Merging twice changes nothing.
    Afterwards it scans and shows what is left.

    \b
    Examples:
      hpc-rerun merge-shards logs/20261127-1130-ab12
      hpc-rerun merge-shards --into result/complied --from result/rerun-text_html=qwen3vl_text/text_html
    """
    if run_dir is not None and not run_dir.is_dir():
        raise UsageProblem(f"{run_dir}: no such run directory")
    if run_dir is None and not sources:
        raise UsageProblem("nothing to merge: give a run directory and/or --from DIR")
    try:
        reports, problems, plan = merge_run(RunDir(run_dir) if run_dir else None, results_root,
                                            [parse_run_dir(v) for v in sources],
                                            overwrite=overwrite, force=force, dry_run=dry_run,
                                            with_provenance=not no_provenance,
                                            recompute_aggregates=recompute_aggregates)
    except ValueError as err:
        raise UsageProblem(str(err)) from None
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "configs": [r.to_json() for r in reports], "problems": problems},
                              indent=2))
    else:
        print_merge(reports, dry_run)
    data_root = data_root or (Path(plan.data_root) if plan.data_root else None)
    task_list = task_list or (Path(plan.task_list) if plan.task_list else None)
    if not dry_run and data_root and task_list and not as_json:
        print_scan(rescan_after_merge(reports, plan, data_root, task_list))
    echo_problems([r.aggregates_kept for r in reports] + [w for r in reports for w in r.summary_kept], problems)


@main.command()
@click.argument("results_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Benchmark data folder (tables/*.xlsx, for the Visualization code).")
@click.option("--config", "only", multiple=True, help="Only this configuration (repeatable).")
@click.option("--write", is_flag=True, help="Rewrite the items whose Metrics differ, and their aggregates.")
@click.option("--recompute-aggregates", is_flag=True,
              help="With --write: rewrite aggregate_metrics even where no rule gives the stored values back.")
@click.option("--jobs", type=int, help="Items scored at once (Visualization code runs in its own process).")
@json_flag
@handles_errors
def rescore(results_root, data_root, only, write, recompute_aggregates, jobs, as_json):
    """Recompute every answered item's Metrics from its own Reference and Prediction; show what differs.

    Text metrics as the benchmark scores them; Visualization code runs in the sandbox against
    tables/<FileName>.xlsx. Without --write nothing is written and the exit code is 1 when some stored
    Metrics differ; with --write those items and their aggregate_metrics are rewritten (the file's own
    rule; untouched groups keep their numbers), atomically with a backup, and aggregate_metrics.csv/.md
    beside them refreshed.

    \b
    Examples:
      hpc-rerun rescore result/complied --data-root data
      hpc-rerun rescore result/complied --data-root data --config qwen3vl_text/text_csv --write
    """
    with Progress(transient=True, disable=as_json) as bar:
        task = bar.add_task("rescoring", total=None)
        reports = rescore_tree(results_root, data_root, write=write, recompute=recompute_aggregates,
                               only=list(only), jobs=jobs, progress=lambda n: bar.advance(task, n))
    problems = [r.problem for r in reports if r.problem]
    reports = [r for r in reports if not r.problem]
    if as_json:
        click.echo(json.dumps({"write": write, "configs": [r.to_json() for r in reports], "problems": problems},
                              indent=2))
    else:
        click.echo("\n".join(rescore_lines(reports, write)))
    echo_problems([r.aggregates_kept for r in reports], problems)
    if not write and any(r.changed_items for r in reports):
        sys.exit(EXIT_GAPS)


@main.command("report")
@click.argument("results_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--create", is_flag=True, help="Also write the tables beside result files that have none yet.")
@click.option("--charts", is_flag=True, help="Also draw each configuration's scores and each variant's heat map.")
@click.option("--dry-run", is_flag=True, help="Show which files would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) written as JSON.")
@handles_errors
def report_command(results_root, create, charts, dry_run, as_json):
    """Regenerate the tables users derive from each result file's aggregate_metrics.

    Beside <variant>/<config>/results*.json: aggregate_metrics.csv (6 decimals) and aggregate_metrics.md
    (2 decimals), in the users' own shapes (rows by question type, then Overall; EM, F1, ROUGE-L,
    SacreBLEU, Pass, ECR, then the others). A file that exists is rewritten (atomically) only when a value
    it shows differs from the aggregates, whatever its number format or row order; --create writes them
    where there are none. Per variant, <variant>/modality_summary.csv: per configuration
    the users' score per question type (mean of EM and F1; Data Analysis with ROUGE-L; Visualization ECR and
    Pass) and Overall (every metric value behind them, pooled); a cell that agrees with the aggregates is
    left as it is, one that does not is kept with a warning; a configuration without a row gets one only
    with --create. At the results root, results_table.tex (the users' paper table: Text x5, Image, Mix x5;
    F1/EM per question type, Data Analysis ROUGE-L/F1/EM, Visualization ECR/Pass) follows the same cell
    rule (--create makes it). merge-shards refreshes all of these by itself.
    --charts draws, with matplotlib, <config>/<config>_scores.png (a bar per question type and Overall) and
    <variant>/scores_heatmap.png.

    \b
    Examples:
      hpc-rerun report result/complied --dry-run
      hpc-rerun report result/complied --create
    """
    written, checked, warnings, problems = regenerate(results_root, create=create, charts=charts, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "written": written, "warnings": warnings, "problems": problems},
                              indent=2))
    else:
        click.echo("\n".join(report_lines(written, checked, dry_run)))
    echo_problems(warnings, problems)


if __name__ == "__main__":
    sys.exit(main())
