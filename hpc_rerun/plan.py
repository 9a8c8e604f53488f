"""plan: turn the runnable gaps into cost-balanced shards and a run directory under logs/.

Cost is an estimate of this engine's GPU seconds per task, fitted to what it measured (docs/performance.md):
the prefill's matrix and causal-attention work over the prompt as the worker will truncate it (table text
from the tokenizer, cached per file; visual tokens from the image header and the pixel limits; never more
than the model's context less the new tokens), plus the task's share of its batch's decode steps. Tasks of
one configuration, table and question type are equal up to the question, and the engine prefills that part
once per batch: the group stays in one shard and only its first task pays for the table.
Shards are packed (whole groups) longest-first onto the least-loaded shard, then improved by moving groups
off the most-loaded one. Tasks of all configurations share shards: one model load serves them all.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image

from .atomic import sha256_file
from .benchmark import FORMATS, IMAGE_DIR, IMAGE_EXT, Config, Task, Variant, load_tasks
from .generation import Generation
from .pixels import visual_tokens
from .protocol import protocol_for
from .rundir import Plan, RunDir, ShardSpec
from .scan import ScanReport

# The packed engine on an H200 with Qwen3-VL-8B (docs/performance.md, gaps_e2e run 4): a long prompt's
# prefill ran at 595 TFLOP/s counting 2 x parameters per token plus causal attention, a sampled decode step
# of a batch took 42 ms, and an 80 GB card's batch holds ~368K cache tokens (prompts + new tokens).
PARAMETERS = 8.77e9
ATTENTION_FLOP_PER_TOKEN_PAIR = 2 * 32 * 128 * 36  # 2 x heads x head_dim x layers: causal, T^2 pairs
PREFILL_FLOPS = 595e12
DECODE_STEP_S = 0.042
BATCH_CACHE_TOKENS = 368_000
OVERHEAD_S = 0.2
DEFAULT_CONTEXT = 262_144  # Qwen3-VL-8B's max_position_embeddings, when the model's config cannot be read
EXPECTED_OUTPUT_TOKENS = {"Visualization": 400, "Data Analysis": 160}
DEFAULT_OUTPUT_TOKENS = 64
BYTES_PER_TOKEN = 3.3  # where the model's tokenizer cannot be loaded here
QUESTION_TOKENS_BASE = 20  # the chat template's tokens after the table, besides the question's own
SHARE_MIN_TOKENS = 1024  # as packed.SHARE_MIN_TOKENS: the engine prefills a shorter common beginning again


@dataclass
class TaskCost:
    config: str
    id: int
    prompt_tokens: int
    seconds: float
    overrides: dict = field(default_factory=dict)  # per-task token_budget / max_pixels (escalation)
    group: tuple = ()  # (configuration, table, question type): kept in one shard, its beginning prefilled once
    alone_s: float | None = None  # its seconds as the first of its group (when a group must be split)

    def entry(self) -> dict:
        return {"config": self.config, "id": self.id, **self.overrides}


class CostModel:
    """Estimates seconds per task; token counts are cached per table file."""

    def __init__(self, data_root: Path, tokenizer=None, generation: Generation | dict | None = None,
                 context: int = DEFAULT_CONTEXT):
        self.data_root = Path(data_root)
        self.tokenizer = tokenizer
        generation = Generation.from_json(generation) if generation is not None else Generation()
        self.max_new_tokens = generation.max_new_tokens
        self.min_new_tokens = int(generation.get("min_new_tokens") or 0)
        self.context = context
        self._text_tokens: dict[str, int] = {}
        self._image_sizes: dict[str, tuple[int, int] | None] = {}

    def text_tokens(self, relpath: str) -> int:
        if relpath not in self._text_tokens:
            path = self.data_root / relpath
            if self.tokenizer is None:
                tokens = int(path.stat().st_size / BYTES_PER_TOKEN)
            else:
                text = path.read_bytes().decode("utf-8", errors="replace")
                tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._text_tokens[relpath] = tokens
        return self._text_tokens[relpath]

    def image_tokens(self, relpath: str, variant: Variant) -> int:
        if relpath not in self._image_sizes:
            Image.MAX_IMAGE_PIXELS = None  # only the header is read; 233 MP tables must not raise a bomb error
            try:
                with Image.open(self.data_root / relpath) as image:
                    self._image_sizes[relpath] = image.size
            except OSError:
                self._image_sizes[relpath] = None
        size = self._image_sizes[relpath]
        return visual_tokens(*size, variant.min_pixels, variant.max_pixels) if size else 0

    def prompt_tokens(self, task: Task, config: Config, variant: Variant) -> int:
        tokens = 200 + len(task.question) // 3  # the prompt template and the question
        if config.modality in ("text", "mix"):
            folder, ext = FORMATS[config.format]
            tokens += self.text_tokens(f"{folder}/{task.file_name}{ext}")
        if config.modality in ("image", "mix"):
            tokens += self.image_tokens(f"{IMAGE_DIR}/{task.file_name}{IMAGE_EXT}", variant)
        return tokens

    def seconds(self, task: Task, prompt_tokens: int, shared: bool = False) -> float:
        """Prefill of the prompt as truncated, plus the task's share of its batch's decode steps: a prompt
        that fills most of a batch's cache pays for all of them, a short one for its part. A ``shared``
        task (not the first of its group) prefills only its question, over the keys of the whole prompt,
        and holds only that in the cache."""
        prompt = min(prompt_tokens, self.context - self.max_new_tokens)
        taken = max(prompt - QUESTION_TOKENS_BASE - len(task.question) // 3, 0) if shared else 0
        if taken < SHARE_MIN_TOKENS:
            taken = 0
        matrix = 2 * PARAMETERS * (prompt - taken)
        prefill = (matrix + ATTENTION_FLOP_PER_TOKEN_PAIR * (prompt**2 - taken**2)) / PREFILL_FLOPS
        output = min(self.max_new_tokens, max(self.min_new_tokens,
                                              EXPECTED_OUTPUT_TOKENS.get(task.question_type, DEFAULT_OUTPUT_TOKENS)))
        share = (prompt - taken + self.max_new_tokens) / BATCH_CACHE_TOKENS
        return OVERHEAD_S + prefill + output * DECODE_STEP_S * (1.0 if share > 0.5 else share)

    def costs(self, tasks: list[tuple[Config, Task, Variant, dict]], scale: float = 1.0) -> list[TaskCost]:
        """Each (configuration, task, variant, overrides) costed, the tasks after the first of their group
        as sharing its beginning; a source file that cannot be read costs its question alone."""
        seen, costs = set(), []
        for config, task, variant, overrides in tasks:
            try:
                tokens = self.prompt_tokens(task, config, variant)
            except OSError:
                tokens = 0
            group = (config.name, task.file_name, task.question_type)
            seconds = self.seconds(task, tokens, shared=group in seen) * scale
            seen.add(group)
            costs.append(TaskCost(config.name, task.id, tokens, seconds, overrides, group,
                                  self.seconds(task, tokens) * scale))
        return costs


def load_tokenizer(model_path: str | None):
    """The model's tokenizer, for counting only (whole tables are measured, never fed as they are); None
    where it cannot be loaded here (no model folder, or no transformers on a login node): the planner then
    estimates tokens from bytes."""
    if not model_path or not Path(model_path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer  # heavy and optional on a login node

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (ImportError, OSError, ValueError):
        return None
    tokenizer.model_max_length = 1 << 40
    return tokenizer


def model_context(model_path: str | None) -> int:
    """The model's positions (text_config.max_position_embeddings in its config.json)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        return int((config.get("text_config") or config)["max_position_embeddings"])
    except (TypeError, OSError, ValueError, KeyError):
        return DEFAULT_CONTEXT


class RunnableCosts:
    """The estimated cost of every runnable task of a scan, for the run's generation settings."""

    def __init__(self, report: ScanReport, variants, model_path: str | None, generation: Generation):
        self.report = report
        self.variants = variants
        self.model = CostModel(report.data_root, load_tokenizer(model_path), generation, model_context(model_path))
        self.tasks = load_tasks(report.task_list)

    def costs(self) -> list[TaskCost]:
        return self.model.costs([(scan.config, self.tasks[task_id], self.variants(scan.config.variant), {})
                                 for scan in self.report.configs for task_id in scan.runnable])


def split_groups(costs: list[TaskCost], units: int) -> list[list[TaskCost]]:
    """The tasks as whole groups (``TaskCost.group``; a task without one alone); while there are fewer
    than ``units`` and a group has several tasks, the heaviest is halved, and the first task of the new
    half pays for the table again (``alone_s``): more shards than groups, each a whole share."""
    by_group: dict[object, list[TaskCost]] = {}
    for n, cost in enumerate(costs):
        by_group.setdefault(cost.group or n, []).append(cost)
    groups = list(by_group.values())
    while len(groups) < units and any(len(g) > 1 for g in groups):
        heaviest = max((g for g in groups if len(g) > 1), key=lambda g: sum(c.seconds for c in g))
        half = len(heaviest) // 2
        first = heaviest[half]
        groups.remove(heaviest)
        groups += [heaviest[:half], [replace(first, seconds=first.alone_s or first.seconds), *heaviest[half + 1:]]]
    return groups


def pack_shards(costs: list[TaskCost], n_shards: int) -> list[list[TaskCost]]:
    """Whole groups (see split_groups) longest-first onto the least-loaded shard, then move groups off the
    heaviest while it helps."""
    groups = split_groups(costs, n_shards)
    weight = {id(g): sum(c.seconds for c in g) for g in groups}
    n_shards = max(1, min(n_shards, len(groups)))
    shards: list[list[list[TaskCost]]] = [[] for _ in range(n_shards)]
    loads = [0.0] * n_shards
    for group in sorted(groups, key=lambda g: (-weight[id(g)], g[0].config, g[0].id)):
        target = loads.index(min(loads))
        shards[target].append(group)
        loads[target] += weight[id(group)]
    for _ in range(10 * len(groups)):
        heavy, light = loads.index(max(loads)), loads.index(min(loads))
        gap = loads[heavy] - loads[light]
        movable = [g for g in shards[heavy] if weight[id(g)] < gap]
        if not movable:
            break
        best = min(movable, key=lambda g: abs(gap / 2 - weight[id(g)]))
        shards[heavy].remove(best)
        shards[light].append(best)
        loads[heavy] -= weight[id(best)]
        loads[light] += weight[id(best)]
    return [[cost for group in shard for cost in group] for shard in shards if shard]


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class RunSettings:
    model: str
    prompts: str | None = None
    generation: Generation = field(default_factory=Generation)  # a dict is read as one
    token_budget: int | None = None
    batch_tokens: int | None = None
    dtype: str = "auto"
    answer_protocols: dict[str, str] = field(default_factory=dict)  # config or variant -> protocol.py preset
    max_input_tokens: int | None = None  # the users' truncation rule (text tokens); None: ours (the context)

    def __post_init__(self):
        self.generation = Generation.from_json(self.generation)

    def to_dict(self) -> dict:
        """As plan.json's ``settings``."""
        return {**asdict(self), "generation": self.generation.to_json()}


def shard_count(total_seconds: float, n_tasks: int, shards: int | None, target_hours: float | None) -> int:
    if shards:
        return min(shards, n_tasks)
    hours = target_hours or 1.0
    return max(1, min(n_tasks, math.ceil(total_seconds / (hours * 3600))))


@dataclass
class PlannedRun:
    """The runnable gaps costed and packed: what ``plan`` prints and ``write_run`` writes."""

    costs: list[TaskCost]
    shards: list[list[TaskCost]]

    def outline(self) -> dict:
        loads = [sum(c.seconds for c in shard) for shard in self.shards]
        total = sum(loads)
        return {"tasks": len(self.costs), "shards": len(self.shards),
                "estimated_gpu_hours": round(total / 3600, 2),
                "estimated_wall_hours": round(max(loads) / 3600, 2),  # the largest shard, each on its own GPU
                "balance_max_over_mean": round(max(loads) / (total / len(loads)), 3),
                "shard_table": [{"shard": n, "tasks": len(s), "cost_s": round(load, 1),
                                 "configs": sorted({c.config for c in s})}
                                for n, (s, load) in enumerate(zip(self.shards, loads))]}


def plan_shards(report: ScanReport, variants, settings: RunSettings, shards: int | None,
                target_hours: float | None) -> PlannedRun | None:
    """Cost every runnable gap of the scan and pack the tasks into shards; None when there is none."""
    costs = RunnableCosts(report, variants, settings.model, settings.generation).costs()
    if not costs:
        return None
    packed = pack_shards(costs, shard_count(sum(c.seconds for c in costs), len(costs), shards, target_hours))
    return PlannedRun(costs, packed)


def write_run(
    logs: Path,
    report: ScanReport,
    shards: list[list[TaskCost]],
    settings: RunSettings,
    variants,
    slurm: dict,
    run_id: str | None = None,
) -> RunDir:
    """Create ``logs/<run-id>/`` with plan.json and one shard spec per array element (attempt 1)."""
    run_id = run_id or new_run_id()
    configs_used = sorted({c.config for shard in shards for c in shard})
    config_settings = {}
    for name in configs_used:
        variant = variants(Config.parse(name).variant)
        config_settings[name] = {k: v for k, v in (("min_pixels", variant.min_pixels),
                                                    ("max_pixels", variant.max_pixels)) if v}
    data_root, task_list = str(Path(report.data_root).resolve()), str(Path(report.task_list).resolve())
    result_files = {s.config.name: {"path": str(Path(s.result_file).resolve()), "sha256": sha256_file(s.result_file)}
                    for s in report.configs if s.result_file is not None and s.config.name in configs_used}
    run = RunDir.create(logs, Plan(
        run_id=run_id, results_root=str(Path(report.results_root).resolve()), data_root=data_root,
        task_list=task_list, settings=settings.to_dict(), slurm=slurm, result_files=result_files,
        keys=("results_root", "data_root", "task_list", "settings", "slurm", "result_files", "run_id", "created",
              "attempts")))
    specs = [ShardSpec(run_id=run_id, attempt=1, shard=number, model=settings.model, data_root=data_root,
                       task_list=task_list, tasks=[c.entry() for c in shard], configs=config_settings,
                       generation=settings.generation, prompts=settings.prompts, token_budget=settings.token_budget,
                       batch_tokens=settings.batch_tokens, dtype=settings.dtype,
                       answer_protocols={name: protocol_for(name, settings.answer_protocols) for name in configs_used},
                       max_input_tokens=settings.max_input_tokens)
             for number, shard in enumerate(shards)]
    run.add_attempt(specs, [sum(c.seconds for c in shard) for shard in shards])
    return run
