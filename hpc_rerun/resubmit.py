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

from .backends import ACTIVE, SubmitOptions, submit_attempt
from .backends.slurm import SlurmOptions
from .benchmark import Config, Variant, load_tasks
from .pixels import SMALLEST_IMAGE_PIXELS
from .plan import CostModel, model_context, pack_shards
from .rundir import Attempt, Record, RunDir
from .status import RunStatus, cost_scale, status_round

SLOW_STATES = {"TIMEOUT", "LOST", "NODE_FAIL", "PREEMPTED", "DEADLINE"}
RETRYABLE_ERRORS = {"oom_text", "oom_image", "format_failure", "timeout", "node_failure", "other"}


def escalate_task(entry: dict, record: Record | None) -> dict:
    """The task entry for the next attempt: after an OOM error, half the prompt tokens (text) or the pixels
    (image) of its last try, or both (image + text: the worker's own ladder halves both, and the error
    cannot say which of the two ran out)."""
    entry = {"config": entry["config"], "id": entry["id"]}
    if record is None or record.provenance.error_class not in ("oom_text", "oom_image"):
        return entry
    provenance = record.provenance
    modality = Config.parse(entry["config"]).modality
    if modality in ("text", "mix") and provenance.prompt_tokens:
        used = provenance.truncated_to_tokens or provenance.prompt_tokens
        entry["token_budget"] = max(used // 2, 1024)
    if modality in ("image", "mix") and provenance.image_pixels:
        entry["max_pixels"] = max(provenance.image_pixels // 2, SMALLEST_IMAGE_PIXELS)
    return entry


def plan_resubmission(status: RunStatus, retry_errors: bool) -> tuple[list[dict], dict]:
    """The task entries to rerun and the Slurm option changes; ([], {}) when nothing needs it."""
    records = status.snapshot.best()
    by_slot = {(s.attempt, s.shard): s for s in status.shards}
    views = [(view, by_slot[(view.attempt.number, view.entry.number)]) for view in status.snapshot.shards]
    active_tasks = {(t["config"], t["id"]) for view, shard in views if shard.state in ACTIVE for t in view.tasks}
    rerun: dict[tuple, dict] = {}
    causes: set[str] = set()
    for view, shard in views:
        if shard.state in ACTIVE:
            continue
        for entry in view.tasks:
            key = (entry["config"], entry["id"])
            if key in active_tasks or key in rerun:
                continue
            record = records.get(key)
            if record is None:
                rerun[key] = escalate_task(entry, None)
                causes.add(shard.state)
            elif retry_errors and record.provenance.error_class in RETRYABLE_ERRORS:
                rerun[key] = escalate_task(entry, record)
    plan = status.snapshot.plan
    options = dict(plan.attempts[-1].slurm or plan.slurm or {})
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
    template = first.spec(first.shards[0])
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


def plan_next_attempt(run: RunDir, retry_errors: bool = False, partition: str | None = None,
                      n_shards: int | None = None) -> tuple[Attempt | None, list[dict]]:
    """Write the next attempt (not submitted): what ended without an answer, escalated by its cause.
    Returns (the attempt or None when nothing needs a rerun, its task entries)."""
    status = status_round(run)
    entries, changes = plan_resubmission(status, retry_errors)
    if not entries:
        return None, []
    options = changes["options"]
    if partition:
        options["partition"] = partition
    ended = [s for s in status.shards if s.needs_rerun]
    slow = any(s.state in SLOW_STATES for s in ended)
    n_shards = n_shards or max(1, len(ended)) * (2 if slow else 1)
    previous = status.snapshot.plan.attempts[-1].cost_scale or 1.0
    attempt = write_attempt(run, entries, n_shards, options, changes["causes"], cost_scale(status.shards) or previous)
    return attempt, entries


def resubmit(run: RunDir, parallel: int = 1, retry_errors: bool = False, partition: str | None = None,
             n_shards: int | None = None, submit: bool = True) -> tuple[Attempt | None, list[dict], str | None]:
    """Plan the next attempt and submit it the way the run was submitted (its escalated Slurm options, or
    ``parallel`` local workers). Returns (attempt or None, its entries, the submission's line or None)."""
    executor = run.executor()
    attempt, entries = plan_next_attempt(run, retry_errors, partition, n_shards)
    if attempt is None or not submit or executor is None:
        return attempt, entries, None
    line = submit_attempt(attempt, executor, SubmitOptions(SlurmOptions.from_dict(attempt.slurm), parallel))
    return attempt, entries, line
