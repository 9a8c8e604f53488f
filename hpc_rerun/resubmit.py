"""resubmit: rerun only what is still missing from shards that ended, as a new attempt, with escalation.

``plan_next_attempt`` writes the attempt; ``resubmit`` also submits it the way the run was submitted.

Never touches a shard that is pending or running. What is missing is recomputed from the shard
files of every attempt. Escalation follows the cause:
- TIMEOUT, LOST, NODE_FAIL, PREEMPTED: twice the time limit and smaller shards (twice as many);
- OUT_OF_MEMORY (host memory): 1.5x the memory;
- with ``retry_errors``, tasks whose answer is a retryable error are rerun too; an OOM error gets half
  the prompt tokens or half the pixels it had, both for image + text (missing and bad inputs are never
  retried).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .backends import SubmitOptions, submit_attempt
from .benchmark import Config, Variant, load_tasks
from .pixels import DEFAULT_MIN_PIXELS
from .plan import CostModel, model_context, pack_shards
from .rundir import Attempt, RunDir, ShardSpec
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
        entry["max_pixels"] = max(provenance["image_pixels"] // 2, DEFAULT_MIN_PIXELS)
    return entry


def plan_resubmission(run: RunDir, statuses: list[ShardStatus], retry_errors: bool) -> tuple[list[dict], dict]:
    """The task entries to rerun and the Slurm option changes; ([], {}) when nothing needs it."""
    attempts = run.attempts()
    records = task_records(run.path)
    by_slot = {(s.attempt, s.shard): s for s in statuses}
    active_tasks = {(t["config"], t["id"]) for a in attempts for shard in a.shards
                    if by_slot[(a.number, shard["shard"])].state in ACTIVE for t in a.spec_tasks(shard)}
    rerun: dict[tuple, dict] = {}
    causes: set[str] = set()
    for attempt in attempts:
        for shard in attempt.shards:
            status = by_slot[(attempt.number, shard["shard"])]
            if status.state in ACTIVE:
                continue
            for entry in attempt.spec_tasks(shard):
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
    options = dict(attempts[-1].slurm or run.load().get("slurm") or {})
    if causes & SLOW_STATES and options.get("time_min"):
        options["time_min"] = int(options["time_min"]) * 2
    if "OUT_OF_MEMORY" in causes and options.get("mem_gb"):
        options["mem_gb"] = int(options["mem_gb"] * 1.5)
    return list(rerun.values()), {"options": options, "causes": sorted(causes)}


def write_attempt(run: RunDir, entries: list[dict], n_shards: int, options: dict, causes: list[str],
                  scale: float = 1.0) -> Attempt:
    """Pack the entries into shards of a new attempt (specs + plan.json). ``scale`` re-fits the cost model
    to what the shards that completed measured."""
    first = run.attempt(1)
    template = ShardSpec.read(first.spec_file(first.shards[0]))
    tasks = load_tasks(template.task_list)
    model = CostModel(Path(template.data_root), generation=template.generation, context=model_context(template.model))
    items = []
    for entry in entries:
        config = Config.parse(entry["config"])
        items.append((config, tasks[entry["id"]], Variant(config.variant, **template.configs.get(config.name, {})),
                      {k: v for k, v in entry.items() if k not in ("config", "id")}))
    shards = pack_shards(model.costs(items, scale), n_shards)
    specs = [replace(template, tasks=[c.entry() for c in shard]) for shard in shards]
    return run.add_attempt(specs, [sum(c.seconds for c in shard) for shard in shards], causes=causes,
                           slurm=options, cost_scale=round(scale, 4))


def plan_next_attempt(run_dir: Path, retry_errors: bool = False, partition: str | None = None,
                      n_shards: int | None = None) -> tuple[Attempt | None, list[dict]]:
    """Write the next attempt (not submitted): what ended without an answer, escalated by its cause.
    Returns (the attempt or None when nothing needs a rerun, its task entries)."""
    run = RunDir(run_dir)
    statuses = gather(run.path)
    entries, changes = plan_resubmission(run, statuses, retry_errors)
    if not entries:
        return None, []
    options = changes["options"]
    if partition:
        options["partition"] = partition
    ended = [s for s in statuses if s.needs_rerun]
    slow = any(s.state in SLOW_STATES for s in ended)
    n_shards = n_shards or max(1, len(ended)) * (2 if slow else 1)
    previous = run.attempt().entry.get("cost_scale", 1.0)
    attempt = write_attempt(run, entries, n_shards, options, changes["causes"], cost_scale(statuses) or previous)
    return attempt, entries


def resubmit(run_dir: Path, parallel: int = 1, retry_errors: bool = False, partition: str | None = None,
             n_shards: int | None = None, submit: bool = True) -> tuple[Attempt | None, list[dict], str | None]:
    """Plan the next attempt and submit it the way the run was submitted (its escalated Slurm options, or
    ``parallel`` local workers). Returns (attempt or None, its entries, the submission's line or None)."""
    run = RunDir(run_dir)
    executor = run.executor()
    attempt, entries = plan_next_attempt(run.path, retry_errors, partition, n_shards)
    if attempt is None or not submit or executor is None:
        return attempt, entries, None
    line = submit_attempt(attempt, executor, SubmitOptions(slurm=attempt.slurm or {}, parallel=parallel))
    return attempt, entries, line
