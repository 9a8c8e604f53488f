"""plan: turn the runnable gaps into cost-balanced shards and a run directory under logs/.

Cost is an estimate of this engine's GPU seconds per task, fitted to what it measured (docs/performance.md):
the prefill's matrix and causal-attention work over the prompt as the worker will truncate it (table text
from the tokenizer, cached per file; visual tokens from the image header and the pixel limits; never more
than the model's context less the new tokens), plus the task's share of its batch's decode steps.
Shards are packed longest-first onto the least-loaded shard, then improved by moving tasks off the
most-loaded one. Tasks of all configurations share shards: one model load serves them all.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_json, sha256_file
from .benchmark import FORMATS, IMAGE_DIR, IMAGE_EXT, Config, Task, Variant, load_tasks
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


@dataclass
class TaskCost:
    config: str
    id: int
    prompt_tokens: int
    seconds: float
    overrides: dict = field(default_factory=dict)  # per-task token_budget / max_pixels (escalation)

    def entry(self) -> dict:
        return {"config": self.config, "id": self.id, **self.overrides}


class CostModel:
    """Estimates seconds per task; token counts are cached per table file."""

    def __init__(self, data_root: Path, tokenizer=None, generation: dict | None = None, context: int = DEFAULT_CONTEXT):
        self.data_root = Path(data_root)
        self.tokenizer = tokenizer
        generation = generation or {}
        self.max_new_tokens = int(generation.get("max_new_tokens") or 4096)
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
        from PIL import Image
        from qwen_vl_utils.vision_process import smart_resize

        from .engine import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, TOKEN_PIXELS

        if relpath not in self._image_sizes:
            Image.MAX_IMAGE_PIXELS = None  # only the header is read; 233 MP tables must not raise a bomb error
            try:
                with Image.open(self.data_root / relpath) as image:
                    self._image_sizes[relpath] = image.size
            except OSError:
                self._image_sizes[relpath] = None
        size = self._image_sizes[relpath]
        if size is None:
            return 0
        max_pixels = variant.max_pixels or DEFAULT_MAX_PIXELS
        min_pixels = min(variant.min_pixels or DEFAULT_MIN_PIXELS, max_pixels)
        h, w = smart_resize(size[1], size[0], factor=TOKEN_PIXELS, min_pixels=min_pixels, max_pixels=max_pixels)
        return (h // TOKEN_PIXELS) * (w // TOKEN_PIXELS)

    def prompt_tokens(self, task: Task, config: Config, variant: Variant) -> int:
        tokens = 200 + len(task.question) // 3  # the prompt template and the question
        if config.modality in ("text", "mix"):
            folder, ext = FORMATS[config.format]
            tokens += self.text_tokens(f"{folder}/{task.file_name}{ext}")
        if config.modality in ("image", "mix"):
            tokens += self.image_tokens(f"{IMAGE_DIR}/{task.file_name}{IMAGE_EXT}", variant)
        return tokens

    def seconds(self, task: Task, prompt_tokens: int) -> float:
        """Prefill of the prompt as truncated, plus the task's share of its batch's decode steps: a prompt
        that fills most of a batch's cache pays for all of them, a short one for its part."""
        prompt = min(prompt_tokens, self.context - self.max_new_tokens)
        prefill = (2 * PARAMETERS * prompt + ATTENTION_FLOP_PER_TOKEN_PAIR * prompt**2) / PREFILL_FLOPS
        output = min(self.max_new_tokens, max(self.min_new_tokens,
                                              EXPECTED_OUTPUT_TOKENS.get(task.question_type, DEFAULT_OUTPUT_TOKENS)))
        share = (prompt + self.max_new_tokens) / BATCH_CACHE_TOKENS
        return OVERHEAD_S + prefill + output * DECODE_STEP_S * (1.0 if share > 0.5 else share)


def model_context(model_path: str | None) -> int:
    """The model's positions (text_config.max_position_embeddings in its config.json)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        return int((config.get("text_config") or config)["max_position_embeddings"])
    except (TypeError, OSError, ValueError, KeyError):
        return DEFAULT_CONTEXT


class RunnableCosts:
    """The estimated cost of every runnable task of a scan, for the run's generation settings."""

    def __init__(self, report: ScanReport, variants, model_path: str | None, generation: dict):
        self.report = report
        self.variants = variants
        self.model = CostModel(report.data_root, load_tokenizer(model_path), generation, model_context(model_path))
        self.tasks = load_tasks(report.task_list)

    def costs(self) -> list[TaskCost]:
        costs = []
        for scan in self.report.configs:
            variant = self.variants(scan.config.variant)
            for task_id in scan.runnable:
                task = self.tasks[task_id]
                tokens = self.model.prompt_tokens(task, scan.config, variant)
                costs.append(TaskCost(scan.config.name, task_id, tokens, self.model.seconds(task, tokens)))
        return costs


def load_tokenizer(model_path: str | None):
    """The model's tokenizer for exact prompt tokens; None (byte estimate) if it cannot be loaded here."""
    if not model_path or not Path(model_path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenizer.model_max_length = 1 << 40  # counting only: whole tables are measured, never fed as is
        return tokenizer
    except (OSError, ValueError):
        return None


def pack_shards(costs: list[TaskCost], n_shards: int) -> list[list[TaskCost]]:
    """Longest-first onto the least-loaded shard, then move tasks off the heaviest while it helps."""
    n_shards = max(1, min(n_shards, len(costs)))
    shards: list[list[TaskCost]] = [[] for _ in range(n_shards)]
    loads = [0.0] * n_shards
    for cost in sorted(costs, key=lambda c: (-c.seconds, c.config, c.id)):
        target = loads.index(min(loads))
        shards[target].append(cost)
        loads[target] += cost.seconds
    for _ in range(10 * len(costs)):
        heavy, light = loads.index(max(loads)), loads.index(min(loads))
        gap = loads[heavy] - loads[light]
        movable = [c for c in shards[heavy] if c.seconds < gap]
        if not movable:
            break
        best = min(movable, key=lambda c: abs(gap / 2 - c.seconds))
        shards[heavy].remove(best)
        shards[light].append(best)
        loads[heavy] -= best.seconds
        loads[light] += best.seconds
    return [s for s in shards if s]


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class RunSettings:
    model: str
    prompts: str | None = None
    generation: dict = field(default_factory=lambda: {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 4096})
    token_budget: int | None = None
    batch_tokens: int | None = None
    dtype: str = "auto"


def shard_count(total_seconds: float, n_tasks: int, shards: int | None, target_hours: float | None) -> int:
    if shards:
        return min(shards, n_tasks)
    hours = target_hours or 1.0
    return max(1, min(n_tasks, math.ceil(total_seconds / (hours * 3600))))


def write_run(
    logs: Path,
    report: ScanReport,
    shards: list[list[TaskCost]],
    settings: RunSettings,
    variants,
    slurm: dict,
    run_id: str | None = None,
) -> Path:
    """Create ``logs/<run-id>/`` with plan.json and one shard spec per array element (attempt 1)."""
    from .shards import ShardSpec

    run_id = run_id or new_run_id()
    run_dir = Path(logs) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    configs_used = sorted({c.config for shard in shards for c in shard})
    config_settings = {}
    for name in configs_used:
        variant = variants(Config.parse(name).variant)
        config_settings[name] = {k: v for k, v in (("min_pixels", variant.min_pixels),
                                                    ("max_pixels", variant.max_pixels)) if v}
    specs = []
    for number, shard in enumerate(shards):
        spec = ShardSpec(run_id=run_id, attempt=1, shard=number, model=settings.model,
                         data_root=str(Path(report.data_root).resolve()),
                         task_list=str(Path(report.task_list).resolve()),
                         tasks=[c.entry() for c in shard], configs=config_settings, generation=settings.generation,
                         prompts=settings.prompts, token_budget=settings.token_budget,
                         batch_tokens=settings.batch_tokens, dtype=settings.dtype)
        specs.append(spec.write(run_dir))
    result_files = {s.config.name: {"path": str(Path(s.result_file).resolve()), "sha256": sha256_file(s.result_file)}
                    for s in report.configs if s.result_file is not None and s.config.name in configs_used}
    plan = {
        "run_id": run_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "results_root": str(Path(report.results_root).resolve()),
        "data_root": str(Path(report.data_root).resolve()),
        "task_list": str(Path(report.task_list).resolve()),
        "settings": asdict(settings),
        "slurm": slurm,
        "result_files": result_files,
        "attempts": [attempt_entry(1, shards, specs, run_dir)],
    }
    atomic_write_json(run_dir / "plan.json", plan)
    return run_dir


def attempt_entry(attempt: int, shards: list[list[TaskCost]], specs: list[Path], run_dir: Path, **extra) -> dict:
    return {
        "attempt": attempt,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "shards": [{"shard": n, "spec": os.path.relpath(spec, run_dir), "tasks": len(shard),
                    "cost_s": round(sum(c.seconds for c in shard), 1),
                    "configs": sorted({c.config for c in shard})} for n, (shard, spec) in enumerate(zip(shards, specs))],
        "jobs": {},
        **extra,
    }


def load_plan(run_dir: Path) -> dict:
    path = Path(run_dir) / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a run directory (no plan.json); runs live under logs/<run-id>/")
    return json.loads(path.read_text())


def save_plan(run_dir: Path, plan: dict) -> None:
    atomic_write_json(Path(run_dir) / "plan.json", plan)
