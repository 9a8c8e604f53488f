"""The `hpc-rerun` command line: one subcommand per step of the flow."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from . import __version__
from .benchmark import DEFAULT_TASK_LIST, BenchmarkError, load_tasks

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
    from .tinymodel import build_tiny_qwen3vl

    path = build_tiny_qwen3vl(out_dir, seed=seed, answer=answer)
    click.echo(f"tiny Qwen3-VL written to {path}")


def default_task_list(data_root: Path) -> Path:
    """QA_final_sc_filled.json in the data root or beside it (where the benchmark keeps it)."""
    for candidate in (data_root / DEFAULT_TASK_LIST, data_root.parent / DEFAULT_TASK_LIST):
        if candidate.exists():
            return candidate
    return data_root / DEFAULT_TASK_LIST


def scan_inputs(results_root, data_root, task_list, project_file, run_dirs, only):
    """Resolve paths (options over the project file) and scan; exits 3 on an unreadable task list."""
    from .project import load_project
    from .scan import scan_tree

    try:
        project = load_project(project_file)
        results_root = results_root or project.results_root
        data_root = data_root or project.data_root
        if results_root is None or data_root is None:
            raise click.UsageError("give RESULTS_ROOT and --data-root (or a --project file that names them)")
        task_list = task_list or project.tasks or default_task_list(data_root)
        tasks = load_tasks(task_list)
    except BenchmarkError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    runs = project.runs + [parse_run_dir(r) for r in run_dirs]
    return project, scan_tree(results_root, tasks, task_list, data_root, runs, list(only) or None, project.configs)


def parse_run_dir(value: str) -> tuple[Path, str | None]:
    path, sep, config = value.partition("=")
    return Path(path), (config if sep else None)


def scan_flags(command):
    options = [
        click.argument("results_root", required=False, type=click.Path(path_type=Path)),
        click.option("--data-root", type=click.Path(path_type=Path),
                     help="Benchmark data folder (latex/, html/, csv/, markdown/, json/, image/, tables/)."),
        click.option("--tasks", "task_list", type=click.Path(path_type=Path),
                     help=f"Task list; default: {DEFAULT_TASK_LIST} in or beside the data root."),
        click.option("--project", "project_file", type=click.Path(path_type=Path),
                     help="Project file (TOML) with results_root, data_root, tasks, [variants], [configs], [runs]."),
        click.option("--run-dir", "run_dirs", multiple=True, metavar="DIR[=CONFIG]",
                     help="A run directory (results_*.json, checkpoint.json) whose answers count too."),
        click.option("--config", "only", multiple=True, metavar="NAME", help="Only this configuration (repeatable)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@scan_flags
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON (ids included).")
@click.option("--write-reports", is_flag=True, help="Write skip_ids.json beside each configuration's result file.")
@click.option("--fail-on-gaps", is_flag=True, help=f"Exit {EXIT_GAPS} when any configuration has runnable gaps.")
def scan(results_root, data_root, task_list, project_file, run_dirs, only, as_json, write_reports, fail_on_gaps):
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
    from .scan import write_skip_reports

    project, report = scan_inputs(results_root, data_root, task_list, project_file, run_dirs, only)
    written = write_skip_reports(report) if write_reports else []
    if as_json:
        out = report.to_json()
        out["variants"] = {v: dataclasses.asdict(project.variant(v)) for v in sorted({c.config.variant for c in report.configs})}
        click.echo(json.dumps(out, indent=2))
    else:
        from .report import print_scan

        print_scan(report, written)
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    if report.problems:
        sys.exit(EXIT_BAD_INPUT)
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
    import logging

    from .worker import run_shard

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    summary = run_shard(spec)
    click.echo(json.dumps(summary))


def slurm_flags(command):
    """Slurm options shared by plan, submit and run (flags win over --profile, which wins over defaults)."""
    options = [
        click.option("--profile", type=click.Path(dir_okay=False, path_type=Path),
                     help="Site profile (TOML): partition, gres, time, memory, setup lines; see slurm/profiles/."),
        click.option("--partition", help="Slurm partition."),
        click.option("--gres", help="GPU GRES per array element [default: gpu:a100:1]."),
        click.option("--cpus", "cpus_per_task", type=int, help="CPUs per element."),
        click.option("--mem-gb", type=int, help="Host memory per element (GB)."),
        click.option("--time-min", type=int, help="Time limit per element (minutes)."),
        click.option("--array-parallelism", type=int, help="Elements running at once."),
        click.option("--account", help="Slurm account."),
        click.option("--qos", help="Slurm QoS."),
        click.option("--sbatch", "extra_sbatch", multiple=True, metavar="KEY=VALUE",
                     help="Extra sbatch option, e.g. --sbatch constraint=a100_80gb (repeatable)."),
        click.option("--setup", multiple=True, metavar="LINE",
                     help="Shell line run before the worker, e.g. 'module load cuda' (repeatable)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def resolve_slurm(kwargs: dict, base: dict | None = None) -> dict:
    from .submit import load_profile, slurm_options

    keys = ("partition", "gres", "cpus_per_task", "mem_gb", "time_min", "array_parallelism", "account", "qos")
    flags = {k: kwargs.pop(k) for k in keys}
    extra = {}
    for item in kwargs.pop("extra_sbatch"):
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--sbatch")
        extra[key.lstrip("-")] = value
    flags["extra_sbatch"] = extra
    flags["setup"] = list(kwargs.pop("setup"))
    try:
        profile = load_profile(kwargs.pop("profile"))
    except BenchmarkError as err:
        raise click.UsageError(str(err)) from None
    return slurm_options({**(base or {}), **profile}, flags)


def plan_flags(command):
    options = [
        click.option("--model", required=True,
                     help="Model folder (from_pretrained), e.g. /models/Qwen3-VL-8B-Instruct."),
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
        click.option("--logs", type=click.Path(file_okay=False, path_type=Path), default=Path("logs"),
                     show_default=True, help="Where run directories are created."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_settings(model, prompts, greedy, max_new_tokens, token_budget):
    from .plan import RunSettings

    generation = ({"do_sample": False, "max_new_tokens": max_new_tokens} if greedy else
                  {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": max_new_tokens})
    return RunSettings(model=str(model), prompts=str(prompts) if prompts else None, generation=generation,
                       token_budget=token_budget)


@main.command()
@scan_flags
@plan_flags
@click.option("--run-id", help="Name of the run directory [default: date-time-random].")
@click.option("--dry-run", is_flag=True, help="Print the shards and sbatch options; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@slurm_flags
def plan(results_root, data_root, task_list, project_file, run_dirs, only, model, shards, gpus, target_hours, prompts,
         greedy, max_new_tokens, token_budget, logs, run_id, dry_run, as_json, **slurm):
    """Turn the runnable gaps into cost-balanced shards and a run directory logs/<run-id>/.

    Scans first (same inputs as `scan`), estimates each runnable task's GPU seconds on this engine
    (prompt tokens from the model's tokenizer, truncated to the model's context; visual tokens from the
    image size and the pixel limits; the expected answer length; rates measured on an H200), prints the
    estimated GPU hours and wall time, and packs tasks of all configurations into shards, longest
    first. Then `hpc-rerun submit logs/<run-id>`.
    """
    from .plan import RunnableCosts, pack_shards, shard_count, write_run
    from .submit import sbatch_preview

    slurm_opts = resolve_slurm(slurm)
    project, report = scan_inputs(results_root, data_root, task_list, project_file, run_dirs, only)
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    settings = run_settings(model, prompts, greedy, max_new_tokens, token_budget)
    costs = RunnableCosts(report, project.variant, model, settings.generation).costs()
    if not costs:
        click.echo("nothing to rerun: no configuration has runnable gaps")
        sys.exit(EXIT_BAD_INPUT if report.problems else 0)
    total = sum(c.seconds for c in costs)
    packed = pack_shards(costs, shard_count(total, len(costs), shards or gpus, target_hours))
    run_dir = None if dry_run else write_run(logs, report, packed, settings, project.variant, slurm_opts, run_id)
    loads = [sum(c.seconds for c in shard) for shard in packed]
    outline = {"run_dir": str(run_dir) if run_dir else None, "tasks": len(costs), "shards": len(packed),
               "estimated_gpu_hours": round(total / 3600, 2),
               "estimated_wall_hours": round(max(loads) / 3600, 2),  # the largest shard, each on its own GPU
               "balance_max_over_mean": round(max(loads) / (sum(loads) / len(loads)), 3),
               "shard_table": [{"shard": n, "tasks": len(s), "cost_s": round(l, 1),
                                "configs": sorted({c.config for c in s})} for n, (s, l) in enumerate(zip(packed, loads))],
               "sbatch": sbatch_preview(slurm_opts, run_dir or Path(logs) / "<run-id>", len(packed)).splitlines()}
    if as_json:
        click.echo(json.dumps(outline, indent=2))
    else:
        from .report import print_plan

        print_plan(outline, dry_run)


def load_run(run_dir: Path) -> dict:
    from .plan import load_plan

    try:
        return load_plan(run_dir)
    except FileNotFoundError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["slurm", "local"]), default="slurm", show_default=True,
              help="slurm: one job array through submitit; local: processes on this machine, one per GPU.")
@click.option("--parallel", type=int, default=1, show_default=True, help="local: CPU workers at once when no GPU.")
@click.option("--attempt", type=int, help="Which attempt to submit [default: the latest].")
@slurm_flags
def submit(run_dir, executor, parallel, attempt, **slurm):
    """Submit a planned run: one Slurm job array (each element one shard on its own GPU), or --executor local.

    Returns at once with the job id; watch with `hpc-rerun status RUN_DIR --watch`.
    """
    from .executors import SlurmUnavailable
    from .submit import submit_local, submit_slurm

    plan_data = load_run(run_dir)
    attempt = attempt or len(plan_data["attempts"])
    entry = plan_data["attempts"][attempt - 1]
    if entry.get("executor"):
        raise click.UsageError(f"attempt {attempt} of {run_dir} was already submitted ({entry['executor']}); "
                               f"use `hpc-rerun resubmit {run_dir}` for what is still missing")
    if executor == "local":
        pid = submit_local(run_dir, attempt, parallel)
        click.echo(f"attempt {attempt}: {len(entry['shards'])} shards running locally (pool pid {pid})")
    else:
        options = resolve_slurm(slurm, entry.get("slurm") or plan_data.get("slurm"))
        try:
            jobs = submit_slurm(run_dir, attempt, options)
        except SlurmUnavailable as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        arrays = sorted({j.split("_")[0] for j in jobs.values()})
        click.echo(f"attempt {attempt}: {len(jobs)} shards submitted as job array {', '.join(arrays)}")
    click.echo(f"watch: hpc-rerun status {run_dir} --watch")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--watch", is_flag=True, help="Refresh until every shard has ended (back-off up to 60 s).")
@click.option("--interval", type=float, default=5, show_default=True, help="First refresh interval (s).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run_dir, watch, interval, as_json):
    """Progress of a run: per shard the scheduler state and done/total; totals, rate, ETA.

    States come from sacct cross-checked with squeue (LOST: gone from both after a grace period);
    done/total from the shard files. Exit 0 when finished with nothing left to rerun, 1 otherwise.
    """
    import time as time_module

    from .status import gather, summary, to_json

    load_run(run_dir)
    while True:
        statuses = gather(run_dir)
        totals = summary(run_dir, statuses)
        if as_json:
            click.echo(json.dumps(to_json(run_dir, statuses), indent=2))
        else:
            from .report import print_status

            print_status(run_dir, statuses, totals)
        if not watch or totals["finished"]:
            break
        time_module.sleep(interval)
        interval = min(interval * 1.5, 60)
    if not totals["finished"] or totals["needs_rerun"]:
        sys.exit(EXIT_GAPS)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--retry-errors", is_flag=True,
              help="Also rerun tasks whose answer is a retryable error (OOM with half the budget/pixels, format).")
@click.option("--partition", help="Send the new attempt to another partition.")
@click.option("--shards", type=int, help="Number of shards for the new attempt.")
@click.option("--parallel", type=int, default=1, show_default=True, help="local: CPU workers at once.")
@click.option("--no-submit", is_flag=True, help="Write the new attempt but do not submit it.")
def resubmit(run_dir, retry_errors, partition, shards, parallel, no_submit):
    """Rerun only what is still missing from shards that ended, as a new attempt, with escalation.

    Shards that are pending or running are never touched. After TIMEOUT or a lost element: twice the
    time and smaller shards; after OUT_OF_MEMORY: more memory. Submits the way the run was submitted.
    """
    from .resubmit import resubmit as plan_next
    from .submit import submit_local, submit_slurm

    plan_data = load_run(run_dir)
    executor = next((a.get("executor") for a in reversed(plan_data["attempts"]) if a.get("executor")), None)
    attempt, entries, options = plan_next(run_dir, retry_errors, partition, shards)
    if attempt is None:
        click.echo("nothing to resubmit: no ended shard has missing tasks")
        return
    click.echo(f"attempt {attempt}: {len(entries)} tasks from shards that ended "
               f"({', '.join(load_run(run_dir)['attempts'][-1].get('causes') or ['-'])})")
    if no_submit:
        return
    if executor == "local":
        pid = submit_local(run_dir, attempt, parallel)
        click.echo(f"running locally (pool pid {pid})")
        return
    from .executors import SlurmUnavailable

    try:
        jobs = submit_slurm(run_dir, attempt, options)
    except SlurmUnavailable as err:
        click.echo(f"error: {err}\nattempt {attempt} is written; submit it with `hpc-rerun submit {run_dir}` "
                   "where Slurm is, or `--executor local`", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"submitted as job array {', '.join(sorted({j.split('_')[0] for j in jobs.values()}))}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def cancel(run_dir):
    """Stop every job of a run (scancel for Slurm, the local pool otherwise). Shard files are kept."""
    from .executors import SlurmUnavailable
    from .submit import cancel as cancel_run

    load_run(run_dir)
    try:
        cancelled = cancel_run(run_dir)
    except SlurmUnavailable as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"cancelled: {', '.join(cancelled)}" if cancelled else "nothing to cancel")


@main.command("run")
@scan_flags
@plan_flags
@click.option("--executor", type=click.Choice(["auto", "slurm", "local"]), default="auto", show_default=True,
              help="auto: Slurm if srun is on PATH, else this machine (it says which).")
@click.option("--max-attempts", type=int, default=3, show_default=True,
              help="Attempts in all: failed or lost shards are resubmitted until then.")
@click.option("--parallel", type=int, default=1, show_default=True, help="local: CPU workers at once when no GPU.")
@slurm_flags
def run_command(results_root, data_root, task_list, project_file, run_dirs, only, model, shards, gpus, target_hours,
                prompts, greedy, max_new_tokens, token_budget, logs, executor, max_attempts, parallel, **slurm):
    """All of it in one command: scan, plan, submit, live progress, resubmit, merge, scan again.

    Ctrl-C leaves the jobs running and prints how to reattach (status, merge-shards).
    Exit 0 when no runnable gap is left, 1 when some are, 3 when an input could not be read.
    """
    from rich.console import Console

    from .pipeline import choose_executor, run_pipeline
    from .report import print_scan

    console = Console()
    slurm_opts = resolve_slurm(slurm)
    project, report = scan_inputs(results_root, data_root, task_list, project_file, run_dirs, only)
    print_scan(report, console=console)
    executor = choose_executor(executor, console)
    if executor == "slurm":
        from .executors import SlurmUnavailable, check_slurm_clients

        try:
            check_slurm_clients()
        except SlurmUnavailable as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
    try:
        run_dir = run_pipeline(report, project.variant, run_settings(model, prompts, greedy, max_new_tokens,
                                                                     token_budget),
                               logs=logs, executor=executor, slurm_options=slurm_opts, shards=shards or gpus,
                               target_hours=target_hours, max_attempts=max_attempts, parallel=parallel,
                               console=console)
    except KeyboardInterrupt:
        sys.exit(130)
    if run_dir is not None:
        _, after = scan_inputs(results_root, data_root, task_list, project_file, run_dirs, only)
        console.print("after the rerun:")
        print_scan(after, console=console)
        report = after
    if report.problems:
        sys.exit(EXIT_BAD_INPUT)
    if any(c.runnable for c in report.configs):
        sys.exit(EXIT_GAPS)


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path),
                default=Path("hpc-rerun-demo"))
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: this machine; slurm: the dev cluster (sudo slurm/dev-cluster start) or your own.")
def demo(directory, executor):
    """The whole pipeline on a bundled mini benchmark with a tiny model, on any laptop (about a minute).

    Writes DIRECTORY: 3 real RealHiTBench tables in every format (images rendered here), 17 tasks of
    every question type, a result tree in all three layouts with every kind of gap, and a tiny Qwen3-VL
    whose weights are set to always answer '[Final Answer]: Yes'. Then it runs `hpc-rerun run` on it
    and shows the scan before and after.
    """
    from rich.console import Console

    from .demo import write_demo
    from .pipeline import run_pipeline
    from .project import Project
    from .report import print_scan
    from .scan import scan_tree

    console = Console()
    paths = write_demo(directory, console)
    project = Project()
    tasks = load_tasks(paths["tasks"])
    before = scan_tree(paths["results"], tasks, paths["tasks"], paths["data"])
    console.print("[bold]before:[/bold]")
    print_scan(before, console=console)
    from .submit import load_profile, slurm_options

    # On Slurm the demo asks for what the dev cluster has (slurm/dev-cluster: partition debug, 4 fake GPUs).
    slurm_opts = slurm_options(load_profile(DEV_CLUSTER_PROFILE) if executor == "slurm" else {}, {})
    settings = run_settings(paths["model"], None, True, 16, None)
    run_pipeline(before, project.variant, settings, logs=directory / "logs", executor=executor,
                 slurm_options=slurm_opts, shards=2, target_hours=None, max_attempts=2, parallel=2,
                 console=console, poll_s=1.0)
    after = scan_tree(paths["results"], tasks, paths["tasks"], paths["data"])
    console.print("[bold]after:[/bold]")
    print_scan(after, console=console)
    left = sum(len(c.runnable) for c in after.configs)
    console.print(f"runnable gaps left: {left} (the rest need source files that do not exist)", highlight=False)
    if left:
        sys.exit(EXIT_GAPS)


def warn_and_exit_on_problems(warnings: list[str | None], problems: list[str]) -> None:
    """Warnings (aggregates left as they were) and errors on stderr; exit 3 if an input could not be used."""
    for warning in filter(None, warnings):
        click.echo(f"warning: {warning}", err=True)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_BAD_INPUT)


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
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
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
    from .merge import MergeLocked, merge_run
    from .scan import rescan_after_merge

    if run_dir is not None and not run_dir.is_dir():
        raise click.UsageError(f"{run_dir}: no such run directory")
    if run_dir is None and not sources:
        raise click.UsageError("nothing to merge: give a run directory and/or --from DIR")
    try:
        reports, problems, plan = merge_run(run_dir, results_root, [parse_run_dir(v) for v in sources],
                                            overwrite=overwrite, force=force, dry_run=dry_run,
                                            with_provenance=not no_provenance,
                                            recompute_aggregates=recompute_aggregates)
    except MergeLocked as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "configs": [r.to_json() for r in reports], "problems": problems},
                              indent=2))
    else:
        from .report import print_merge

        print_merge(reports, dry_run)
    data_root = data_root or (Path(plan["data_root"]) if plan.get("data_root") else None)
    task_list = task_list or (Path(plan["task_list"]) if plan.get("task_list") else None)
    if not dry_run and data_root and task_list and not as_json:
        from .report import print_scan

        print_scan(rescan_after_merge(reports, plan, data_root, task_list))
    warn_and_exit_on_problems([r.aggregates_kept for r in reports], problems)


@main.command()
@click.argument("results_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Benchmark data folder (tables/*.xlsx, for the Visualization code).")
@click.option("--config", "only", multiple=True, help="Only this configuration (repeatable).")
@click.option("--write", is_flag=True, help="Rewrite the items whose Metrics differ, and their aggregates.")
@click.option("--recompute-aggregates", is_flag=True,
              help="With --write: rewrite aggregate_metrics even where no rule gives the stored values back.")
@click.option("--jobs", type=int, help="Items scored at once (Visualization code runs in its own process).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
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
    from rich.progress import Progress

    from .merge import MergeLocked
    from .rescore import rescore as rescore_tree

    with Progress(transient=True, disable=as_json) as bar:
        task = bar.add_task("rescoring", total=None)
        try:
            reports = rescore_tree(results_root, data_root, write=write, recompute=recompute_aggregates,
                                   only=list(only), jobs=jobs, progress=lambda n: bar.advance(task, n))
        except MergeLocked as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
    problems = [r.problem for r in reports if r.problem]
    reports = [r for r in reports if not r.problem]
    if as_json:
        click.echo(json.dumps({"write": write, "configs": [r.to_json() for r in reports], "problems": problems},
                              indent=2))
    else:
        for r in reports:
            metrics = ", ".join(f"{name} {count}" for name, count in sorted(r.changed.items())) or "-"
            click.echo(f"{r.config}: {r.items} answered, {r.changed_items} differ ({metrics})"
                       f"{', written' if r.written else ''}")
            for example in r.examples:
                click.echo(f"  id {example['id']}: stored {example['stored']} -> {example['rescored']}")
        total = sum(r.changed_items for r in reports)
        click.echo(f"{total} item(s) whose stored Metrics differ{'' if write or not total else ' (--write to fix)'}")
    warn_and_exit_on_problems([r.aggregates_kept for r in reports], problems)
    if not write and any(r.changed_items for r in reports):
        sys.exit(EXIT_GAPS)


@main.command("report")
@click.argument("results_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--create", is_flag=True, help="Also write the tables beside result files that have none yet.")
@click.option("--charts", is_flag=True, help="Also draw each configuration's scores and each variant's heat map.")
@click.option("--dry-run", is_flag=True, help="Show which files would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) written as JSON.")
def report_command(results_root, create, charts, dry_run, as_json):
    """Regenerate the tables users derive from each result file's aggregate_metrics.

    Beside <variant>/<config>/results*.json: aggregate_metrics.csv (6 decimals) and aggregate_metrics.md
    (2 decimals), in the users' own shapes (rows by question type, then Overall; EM, F1, ROUGE-L,
    SacreBLEU, Pass, ECR, ProcessingTime). Files that exist are rewritten when they differ (atomically);
    --create writes them where there are none. merge-shards refreshes the existing ones by itself.
    --charts draws, with matplotlib, <config>/<config>_scores.png (the users' score per question type: mean
    of EM and F1; Data Analysis with ROUGE-L; Visualization ECR and Pass) and <variant>/scores_heatmap.png.

    \b
    Examples:
      hpc-rerun report result/complied --dry-run
      hpc-rerun report result/complied --create
    """
    from .derived import aggregate_type_scores, refresh, write_charts
    from .results import ResultFileError, load_result_file
    from .scan import discover_configs

    files, problems = discover_configs(results_root)
    written, scores = {}, {}
    for config, path in sorted(files.items(), key=lambda kv: kv[0].name):
        try:
            result = load_result_file(path)
        except ResultFileError as err:
            problems.append(str(err))
            continue
        aggregates = result.data.get("aggregate_metrics") if isinstance(result.data, dict) else None
        if isinstance(aggregates, dict) and aggregates:
            written[config.name] = [str(p) for p in refresh(path, aggregates, create=create, dry_run=dry_run)]
            scores.setdefault(path.parent.parent, {})[path.parent.name] = aggregate_type_scores(aggregates, result.items)
    if charts:
        for variant_dir, by_leaf in scores.items():
            paths = [] if dry_run else write_charts(variant_dir, by_leaf)
            written[f"{variant_dir.name} charts"] = [str(p) for p in paths]
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "written": written, "problems": problems}, indent=2))
    else:
        changed = [p for paths in written.values() for p in paths]
        for path in changed:
            click.echo(f"{'would write' if dry_run else 'wrote'} {path}")
        click.echo(f"{len(changed)} file(s) {'to write' if dry_run else 'written'}; "
                   f"{sum(map(len, scores.values()))} configuration(s) with aggregate_metrics checked")
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
