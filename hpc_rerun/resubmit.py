"""resubmit: rerun only what is still missing from shards that ended, as a new attempt, with escalation.

Never touches a shard that is pending or running. What is missing is recomputed from the shard
files of every attempt. Escalation follows the cause:
- TIMEOUT, LOST, NODE_FAIL, PREEMPTED: twice the time limit and smaller shards (twice as many);
- OUT_OF_MEMORY (host memory): 1.5x the memory;
- with ``retry_errors``, tasks whose answer is a retryable error are rerun too; an OOM error gets half
  the prompt tokens or half the pixels it had, both for image + text (missing and bad inputs are never
  retried).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .benchmark import Config, Variant, load_tasks
from .plan import CostModel, attempt_entry, load_plan, model_context, pack_shards, save_plan
from .shards import ShardSpec
from .status import ACTIVE, ShardStatus, cost_scale, gather, task_records

SLOW_STATES = {"TIMEOUT", "LOST", "NODE_FAIL", "PREEMPTED", "DEADLINE"}
RETRYABLE_ERRORS = {"oom_text", "oom_image", "format_failure", "timeout", "node_failure", "other"}


def escalate_task(entry: dict, record: dict | None) -> dict:
    """The task entry for the next attempt: after an OOM error, half the prompt tokens (text) or the pixels
    (image) of its last try, or both (image + text: the worker's own ladder halves both, and the error
    cannot say which of the two ran out)."""
    provenance = (record or {}).get("provenance") or {}
    error_class = provenance.get("error_class")
    modality = Config.parse(entry["config"]).modality
    entry = {"config": entry["config"], "id": entry["id"]}
    if error_class not in ("oom_text", "oom_image"):
        return entry
    if modality in ("text", "mix") and provenance.get("prompt_tokens"):
        used = provenance.get("truncated_to_tokens") or provenance["prompt_tokens"]
        entry["token_budget"] = max(used // 2, 1024)
    if modality in ("image", "mix") and provenance.get("image_pixels"):
        entry["max_pixels"] = max(provenance["image_pixels"] // 2, 4 * 32 * 32)
    return entry


def plan_resubmission(run_dir: Path, statuses: list[ShardStatus], retry_errors: bool) -> tuple[list[dict], dict]:
    """The task entries to rerun and the Slurm option changes; ([], {}) when nothing needs it."""
    plan = load_plan(run_dir)
    records = task_records(run_dir)
    active_tasks = set()
    by_slot = {(s.attempt, s.shard): s for s in statuses}
    for attempt in plan["attempts"]:
        for shard in attempt["shards"]:
            if by_slot[(attempt["attempt"], shard["shard"])].state in ACTIVE:
                spec = json.loads((run_dir / shard["spec"]).read_text())
                active_tasks.update((t["config"], t["id"]) for t in spec["tasks"])
    rerun: dict[tuple, dict] = {}
    causes: set[str] = set()
    for attempt in plan["attempts"]:
        for shard in attempt["shards"]:
            status = by_slot[(attempt["attempt"], shard["shard"])]
            if status.state in ACTIVE:
                continue
            spec = json.loads((run_dir / shard["spec"]).read_text())
            for entry in spec["tasks"]:
                key = (entry["config"], entry["id"])
                if key in active_tasks or key in rerun:
                    continue
                record = records.get(key)
                error_class = ((record or {}).get("provenance") or {}).get("error_class")
                if record is None:
                    rerun[key] = escalate_task(entry, None)
                    causes.add(status.state)
                elif retry_errors and error_class in RETRYABLE_ERRORS:
                    rerun[key] = escalate_task(entry, record)
    options = dict(plan["attempts"][-1].get("slurm") or plan.get("slurm") or {})
    if causes & SLOW_STATES and options.get("time_min"):
        options["time_min"] = int(options["time_min"]) * 2
    if "OUT_OF_MEMORY" in causes and options.get("mem_gb"):
        options["mem_gb"] = int(options["mem_gb"] * 1.5)
    options["_causes"] = sorted(causes)
    return list(rerun.values()), options


def write_attempt(run_dir: Path, entries: list[dict], n_shards: int, options: dict, scale: float = 1.0) -> int:
    """Pack the entries into shards of a new attempt (specs + plan.json); returns the attempt number.
    ``scale`` re-fits the cost model to what the shards that completed measured."""
    plan = load_plan(run_dir)
    template = ShardSpec.read(run_dir / plan["attempts"][0]["shards"][0]["spec"])
    tasks = load_tasks(template.task_list)
    model = CostModel(Path(template.data_root), generation=template.generation, context=model_context(template.model))
    items = []
    for entry in entries:
        config = Config.parse(entry["config"])
        items.append((config, tasks[entry["id"]], Variant(config.variant, **template.configs.get(config.name, {})),
                      {k: v for k, v in entry.items() if k not in ("config", "id")}))
    shards = pack_shards(model.costs(items, scale), n_shards)
    attempt = len(plan["attempts"]) + 1
    specs = []
    for number, shard in enumerate(shards):
        spec = ShardSpec(**{**asdict(template), "attempt": attempt, "shard": number,
                            "tasks": [c.entry() for c in shard]})
        specs.append(spec.write(run_dir))
    causes = options.pop("_causes", [])
    plan["attempts"].append(attempt_entry(attempt, shards, specs, run_dir, causes=causes, slurm=options,
                                          cost_scale=round(scale, 4)))
    save_plan(run_dir, plan)
    return attempt


def resubmit(run_dir: Path, retry_errors: bool = False, partition: str | None = None,
             n_shards: int | None = None) -> tuple[int | None, list[dict], dict]:
    """Plan the next attempt; returns (attempt or None, its task entries, its Slurm options)."""
    statuses = gather(run_dir)
    entries, options = plan_resubmission(run_dir, statuses, retry_errors)
    if not entries:
        return None, [], options
    if partition:
        options["partition"] = partition
    ended = [s for s in statuses if s.needs_rerun]
    slow = any(s.state in SLOW_STATES for s in ended)
    n_shards = n_shards or max(1, len(ended)) * (2 if slow else 1)
    previous = load_plan(run_dir)["attempts"][-1].get("cost_scale", 1.0)
    attempt = write_attempt(run_dir, entries, n_shards, options, cost_scale(statuses) or previous)
    return attempt, entries, options
