"""The `hpc-rerun` command line: one subcommand per step of the flow."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from . import __version__
from .benchmark import DEFAULT_TASK_LIST, BenchmarkError, Config, load_tasks

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


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hpc-rerun")
def main() -> None:
    pass


@main.command("build-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
def build_tiny_model(out_dir: Path, seed: int) -> None:
    """Write a tiny random Qwen3-VL (real architecture and processor, ~1 MB) to OUT_DIR.

    It loads with Qwen3VLForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained,
    exactly like Qwen3-VL-8B-Instruct, and needs no model hub. Tests and the demo use it.
    """
    from .tinymodel import build_tiny_qwen3vl

    path = build_tiny_qwen3vl(out_dir, seed=seed)
    click.echo(f"tiny Qwen3-VL written to {path}")


def default_task_list(data_root: Path) -> Path:
    """QA_final_sc_filled.json in the data root or beside it (where the benchmark keeps it)."""
    for candidate in (data_root / DEFAULT_TASK_LIST, data_root.parent / DEFAULT_TASK_LIST):
        if candidate.exists():
            return candidate
    return data_root / DEFAULT_TASK_LIST


def parse_run_dir(value: str) -> tuple[Path, str | None]:
    path, sep, config = value.partition("=")
    return Path(path), (config if sep else None)


@main.command()
@click.argument("results_root", required=False, type=click.Path(path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path),
              help="Benchmark data folder (latex/, html/, csv/, markdown/, json/, image/, tables/).")
@click.option("--tasks", "task_list", type=click.Path(path_type=Path),
              help=f"Task list; default: {DEFAULT_TASK_LIST} in or beside the data root.")
@click.option("--project", "project_file", type=click.Path(path_type=Path),
              help="Project file (TOML) with results_root, data_root, tasks, [variants], [configs], [runs].")
@click.option("--run-dir", "run_dirs", multiple=True, metavar="DIR[=CONFIG]",
              help="A run directory (results_*.json, checkpoint.json) whose answers count too; "
                   "its configuration is read from its files unless given.")
@click.option("--config", "only", multiple=True, metavar="NAME", help="Only this configuration (repeatable).")
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
    from .project import load_project
    from .scan import scan_tree, write_skip_reports

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
    report = scan_tree(results_root, tasks, task_list, data_root, runs, only, project.configs)
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
@click.option("--greedy", is_flag=True, help="Greedy decoding instead of the configuration's sampling settings.")
@click.option("-v", "--verbose", is_flag=True, help="Log each failed task and retry.")
def worker(spec, greedy, verbose):
    """Run one shard (SPEC = <run>/attempt-N/shard-NNNN.json) on this machine.

    Loads the model once, answers every task not yet in the shard file (SPEC with .jsonl), and appends
    one record per task. Safe to rerun: it resumes where the file ends. This is what each Slurm array
    element runs.
    """
    import logging

    from .worker import run_shard

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    summary = run_shard(spec, greedy=greedy)
    click.echo(json.dumps(summary))


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
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def merge_shards(run_dir, results_root, sources, data_root, task_list, overwrite, force, dry_run, no_provenance,
                 as_json):
    """Merge the answers of RUN_DIR's shards (and/or --from run directories) into the result files.

    Per task the best answer wins (success over error, newer attempt over older). [ERROR] items are
    replaced, absent ids inserted, existing successes kept (unless --overwrite). Each file keeps its
    layout, is written atomically with a backup beside it (results.json.bak-<time>), and its
    aggregate_metrics, checkpoint.json and skip_ids.json are refreshed. Merging twice changes nothing.
    Afterwards it scans and shows what is left.

    \b
    Examples:
      hpc-rerun merge-shards logs/20261127-1130-ab12
      hpc-rerun merge-shards --into result/complied --from result/rerun-text_html=qwen3vl_text/text_html
    """
    from .merge import MergeLocked, merge, run_dir_records, shard_records
    from .scan import discover_configs, load_run_dir, run_dir_config, scan_tree, write_skip_reports

    plan = {}
    if run_dir is not None:
        plan_path = run_dir / "plan.json"
        if not run_dir.is_dir():
            raise click.UsageError(f"{run_dir}: no such run directory")
        plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    results_root = results_root or (Path(plan["results_root"]) if plan.get("results_root") else None)
    if results_root is None:
        raise click.UsageError("say where to merge: --into RESULTS_ROOT (or give a run directory with a plan.json)")
    if run_dir is None and not sources:
        raise click.UsageError("nothing to merge: give a run directory and/or --from DIR")
    result_files, problems = discover_configs(results_root)
    result_files.update({Config.parse(c): Path(f["path"]) for c, f in plan.get("result_files", {}).items()})
    records = shard_records(run_dir) if run_dir is not None else []
    for value in sources:
        source, config_name = parse_run_dir(value)
        try:
            files = load_run_dir(source)
            config = Config.parse(config_name) if config_name else run_dir_config(source, files, list(result_files))
        except ValueError as err:
            problems.append(str(err))
            continue
        records += run_dir_records(files, config.name)
    planned = {c: f["sha256"] for c, f in plan.get("result_files", {}).items()} or None
    try:
        reports = merge({c.name: p for c, p in result_files.items()}, records, results_root=results_root,
                        planned_hashes=planned, run_dir=run_dir, overwrite=overwrite, force=force, dry_run=dry_run,
                        with_provenance=not no_provenance)
    except MergeLocked as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    problems += [r.problem for r in reports if r.problem]
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "configs": [r.to_json() for r in reports], "problems": problems},
                              indent=2))
    else:
        from .report import print_merge

        print_merge(reports, dry_run)
    data_root = data_root or (Path(plan["data_root"]) if plan.get("data_root") else None)
    task_list = task_list or (Path(plan["task_list"]) if plan.get("task_list") else None)
    if not dry_run and data_root and task_list and not as_json:
        merged = [r.config for r in reports if r.path is not None and not r.problem]
        report = scan_tree(results_root, load_tasks(task_list), task_list, data_root, only=merged,
                           named_configs={Config.parse(c): Path(f["path"]) for c, f in plan.get("result_files", {}).items()})
        write_skip_reports(report)
        from .report import print_scan

        print_scan(report)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
