"""The run directory, ``logs/<run-id>/``: the one place that knows its files and writes them.

    plan.json                   the run's state: inputs, settings, Slurm options, result files' hashes,
                                and per attempt its shards, executor, job ids and Slurm job name, pool
                                pid, causes
    attempt-N/shard-NNNN.json   a shard spec: what one array element (or local worker) runs
    attempt-N/shard-NNNN.jsonl  its records, one per task, appended as answered
    attempt-N/shard-NNNN.log    a local worker's output
    attempt-N/local-pool.log    the local pool's output; local-state.json: its shards' states
    submitit/                   submitit's scripts, pickles and logs (Slurm)
    merged.json                 each result file's hash after our last merge (a rerun of the merge accepts it)
    merge-report.md/.png        the before/after of the last merge

Records are the original item schema plus ``provenance`` (config, run, attempt, shard, Slurm ids, host,
GPU, times, tokens, pixel cap, retries, error class). Each line is flushed and fsynced; a torn last line
(the writer was killed mid-write) is cut off on the next open, never fatal. plan.json and specs are
written atomically; every step reads and writes them through ``RunDir`` and ``Attempt``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from .atomic import atomic_write_json

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
LEDGER_FILE = "merged.json"  # each result file's hash after our last merge into it


class NotARunDir(FileNotFoundError):
    """The folder has no plan.json."""


@dataclass
class ShardSpec:
    """What one array element runs: its tasks and the run's model, data and generation settings."""

    run_id: str
    attempt: int
    shard: int
    model: str
    data_root: str
    task_list: str
    tasks: list[dict]  # [{"config": "<variant>/<modality_format>", "id": int, overrides...}, ...]
    configs: dict[str, dict]  # config name -> {"min_pixels", "max_pixels"} (its variant's settings)
    generation: dict = field(default_factory=lambda: {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 4096})
    prompts: str | None = None  # the user's benchmark checkout; None: our default prompt set
    token_budget: int | None = None  # prompt tokens per task; None: from the device's memory
    batch_tokens: int | None = None  # tokens per batch (K/V cache, or padded prompts); None: from the device
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on the CPU

    def write(self, run_path: str | Path) -> Path:
        """This spec at its place in the run directory ``run_path``, written atomically; returns its path."""
        path = RunDir(run_path).spec_path(self.attempt, self.shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "ShardSpec":
        with open(path, "rb") as fh:
            return cls(**json.load(fh))


def records_path(spec_path: str | Path) -> Path:
    """A shard's records file: its spec's path with ``.jsonl``."""
    return Path(spec_path).with_suffix(".jsonl")


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Every complete record of a shard file. With ``repair``, a torn last line is cut off the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes): the writer stopped mid-record", path, len(data) - end)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a corrupt record", path, number)
    return records


def record_key(record: dict) -> tuple[str | None, int | None]:
    """(configuration, task id) of a shard record."""
    return (record.get("provenance") or {}).get("config"), record.get("id")


class RecordWriter:
    """Appends one JSON line per record, flushed and fsynced before the next task starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "ab")

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def now_iso() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


class RunDir:
    """``logs/<run-id>/`` and its plan.json. Reads are fresh each time: other processes (submit, resubmit)
    may have written since."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, logs: str | Path, run_id: str, plan: dict) -> "RunDir":
        """A new run directory with its plan (``attempts`` empty; add them with ``add_attempt``)."""
        run = cls(Path(logs) / run_id)
        run.path.mkdir(parents=True, exist_ok=False)
        run.save({**plan, "run_id": run_id, "created": now_iso(), "attempts": []})
        return run

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def submitit_folder(self) -> Path:
        return self.path / "submitit"

    def is_run(self) -> bool:
        return self.plan_path.exists()

    def load(self) -> dict:
        if not self.plan_path.exists():
            raise NotARunDir(f"{self.plan_path}: not a run directory (no {PLAN_FILE}); runs live under logs/<run-id>/")
        return json.loads(self.plan_path.read_text())

    def save(self, plan: dict) -> None:
        atomic_write_json(self.plan_path, plan)

    @contextmanager
    def editing(self) -> Iterator[dict]:
        """plan.json read, changed by the block, written back atomically."""
        plan = self.load()
        yield plan
        self.save(plan)

    def attempts(self) -> list["Attempt"]:
        return [Attempt(self, entry) for entry in self.load()["attempts"]]

    def attempt(self, number: int | None = None) -> "Attempt":
        """Attempt ``number`` (1-based); the latest when None."""
        attempts = self.attempts()
        if number is None:
            return attempts[-1]
        if not 1 <= number <= len(attempts):
            raise ValueError(f"{self.path}: no attempt {number} (it has {len(attempts)})")
        return attempts[number - 1]

    def add_attempt(self, specs: list[ShardSpec], costs: list[float], **extra) -> "Attempt":
        """Write the specs of a new attempt and its entry in plan.json; ``costs`` are the shards' seconds."""
        with self.editing() as plan:
            number = len(plan["attempts"]) + 1
            shards = []
            for shard_number, (spec, cost) in enumerate(zip(specs, costs)):
                spec = replace(spec, attempt=number, shard=shard_number)
                path = spec.write(self.path)
                shards.append({"shard": shard_number, "spec": os.path.relpath(path, self.path),
                               "tasks": len(spec.tasks), "cost_s": round(cost, 1),
                               "configs": sorted({t["config"] for t in spec.tasks})})
            entry = {"attempt": number, "created": now_iso(), "shards": shards, "jobs": {}, **extra}
            plan["attempts"].append(entry)
        return Attempt(self, entry)

    def load_ledger(self) -> dict[str, list[str]]:
        """config -> the result file's hashes our merges wrote."""
        path = self.path / LEDGER_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def save_ledger(self, ledger: dict[str, list[str]]) -> None:
        atomic_write_json(self.path / LEDGER_FILE, ledger)

    @property
    def merge_report_stem(self) -> Path:
        """``merge-report`` (``.md``, ``.png``) in the run directory."""
        return self.path / "merge-report"

    def spec_path(self, attempt: int, shard: int) -> Path:
        return self.path / f"attempt-{attempt}" / f"shard-{shard:04d}.json"

    def record_files(self) -> list[Path]:
        """Every shard's records file of every attempt, in name order."""
        return sorted(self.path.glob("attempt-*/shard-*.jsonl"))

    def executor(self) -> str | None:
        """How the run was submitted: the latest submitted attempt's executor."""
        return next((a.executor for a in reversed(self.attempts()) if a.executor), None)


@dataclass
class Attempt:
    """One attempt's entry in plan.json and its folder ``attempt-N/``."""

    run: RunDir
    entry: dict

    @property
    def number(self) -> int:
        return self.entry["attempt"]

    @property
    def folder(self) -> Path:
        return self.run.path / f"attempt-{self.number}"

    @property
    def shards(self) -> list[dict]:
        """{"shard", "spec" (relative path), "tasks" (count), "cost_s", "configs"} per shard."""
        return self.entry["shards"]

    @property
    def executor(self) -> str | None:
        return self.entry.get("executor")

    @property
    def jobs(self) -> dict[str, str]:
        """Shard number (as text) -> Slurm element id (``123_4``)."""
        return self.entry.get("jobs") or {}

    @property
    def submitted(self) -> dt.datetime | None:
        return dt.datetime.fromisoformat(self.entry["submitted"]) if self.entry.get("submitted") else None

    @property
    def slurm(self) -> dict | None:
        return self.entry.get("slurm")

    @property
    def causes(self) -> list[str]:
        return self.entry.get("causes") or []

    @property
    def pool_pid(self) -> int | None:
        return self.entry.get("pool_pid")

    def spec_file(self, shard: dict) -> Path:
        return self.run.path / shard["spec"]

    def records_file(self, shard: dict) -> Path:
        return records_path(self.spec_file(shard))

    def spec_tasks(self, shard: dict) -> list[dict]:
        return ShardSpec.read(self.spec_file(shard)).tasks

    def records(self, shard: dict) -> list[dict]:
        return read_records(self.records_file(shard))

    def worker_log(self, shard: dict) -> Path:
        return self.folder / f"shard-{shard['shard']:04d}.log"

    @property
    def pool_log(self) -> Path:
        return self.folder / "local-pool.log"

    @property
    def local_state_file(self) -> Path:
        return self.folder / "local-state.json"

    def record_submission(self, executor: str, jobs: dict, options: dict | None = None, **extra) -> None:
        """Who runs this attempt (``slurm`` or ``local``), its job ids and when: what later steps reattach by."""
        with self.run.editing() as plan:
            entry = plan["attempts"][self.number - 1]
            entry.update(executor=executor, jobs={str(k): v for k, v in jobs.items()}, submitted=now_iso(), **extra)
            if options is not None:
                entry["slurm"] = options
        self.entry = entry
