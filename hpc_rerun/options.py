"""The command line's option groups, as small dataclasses that know what they mean.

``ScanInputs`` (what to scan: results root, data root, task list, project file, extra run directories),
``PlanChoices`` (model, shards, generation, where runs go) and ``SlurmChoices`` (a site profile and the
Slurm flags given; each flag is declared once, in ``backends.slurm.SlurmOptions``). cli.py declares the
flags; the steps receive these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backends.slurm import SlurmOptions
from .benchmark import DEFAULT_TASK_LIST, BenchmarkError, load_tasks
from .generation import Generation
from .plan import RunSettings
from .project import load_project
from .scan import scan_tree


class UsageProblem(ValueError):
    """The command was given options that cannot work together (exit 2, like click's own errors)."""


def default_task_list(data_root: Path) -> Path:
    """QA_final_sc_filled.json in the data root or beside it (where the benchmark keeps it)."""
    for candidate in (data_root / DEFAULT_TASK_LIST, data_root.parent / DEFAULT_TASK_LIST):
        if candidate.exists():
            return candidate
    return data_root / DEFAULT_TASK_LIST


def parse_run_dir(value: str) -> tuple[Path, str | None]:
    """``DIR[=CONFIG]`` -> (DIR, CONFIG or None)."""
    path, sep, config = value.partition("=")
    return Path(path), (config if sep else None)


@dataclass
class ScanInputs:
    results_root: Path | None
    data_root: Path | None
    task_list: Path | None
    project_file: Path | None
    run_dirs: tuple[str, ...]
    only: tuple[str, ...]

    def scan(self):
        """(project, scan report): paths from the options over the project file. Raises BenchmarkError on an
        unreadable task list or project file."""
        project = load_project(self.project_file)
        results_root = self.results_root or project.results_root
        data_root = self.data_root or project.data_root
        if results_root is None or data_root is None:
            raise UsageProblem("give RESULTS_ROOT and --data-root (or a --project file that names them)")
        task_list = self.task_list or project.tasks or default_task_list(data_root)
        tasks = load_tasks(task_list)
        runs = project.runs + [parse_run_dir(r) for r in self.run_dirs]
        return project, scan_tree(results_root, tasks, task_list, data_root, runs, list(self.only) or None,
                                  project.configs)


@dataclass
class PlanChoices:
    model: Path
    shards: int | None
    gpus: int | None
    target_hours: float | None
    prompts: Path | None
    greedy: bool
    max_new_tokens: int
    token_budget: int | None
    max_input_tokens: int | None
    logs: Path

    @property
    def n_shards(self) -> int | None:
        return self.shards or self.gpus

    def settings(self, project=None) -> RunSettings:
        """The run's settings; ``project`` (project.Project) gives each configuration's answer protocol."""
        generation = Generation.greedy(self.max_new_tokens) if self.greedy else Generation.sampled(self.max_new_tokens)
        return RunSettings(model=str(self.model), prompts=str(self.prompts) if self.prompts else None,
                           generation=generation, token_budget=self.token_budget,
                           answer_protocols=dict(project.protocols) if project else {},
                           max_input_tokens=self.max_input_tokens)


@dataclass
class SlurmChoices:
    """A site profile and the Slurm flags given on the command line (field name -> value)."""

    profile: Path | None
    flags: dict

    def resolve(self, base: dict | None = None) -> SlurmOptions:
        """The Slurm options: defaults < ``base`` (what the run was planned with) < profile < flags."""
        try:
            return SlurmOptions.resolve(self.flags, self.profile, base)
        except BenchmarkError as err:  # a flag's or profile's value that does not work: usage, as click's own
            raise UsageProblem(str(err)) from None
