"""The run directory, ``logs/<run-id>/``: the one place that knows its files, reads and writes them.

    plan.json                   the run's state (``Plan``): inputs, settings, Slurm options, result files'
                                hashes, and per attempt (``Attempt``) its shards (``ShardEntry``), executor,
                                job ids and Slurm job name, pool pid, causes
    attempt-N/shard-NNNN.json   a shard spec (``ShardSpec``): what one array element (or local worker) runs
    attempt-N/shard-NNNN.jsonl  its records (``Record``), one per task, appended as answered
    attempt-N/shard-NNNN.log    a local worker's output
    attempt-N/local-pool.log    the local pool's output; local-state.json: its shards' states
    submitit/                   submitit's scripts, pickles and logs (Slurm)
    merged.json                 each result file's hash after our last merge (a rerun of the merge accepts it)
    merge-report.md/.png        the before/after of the last merge

Records are the original item schema plus ``provenance`` (``Provenance``: config, run, attempt, shard, Slurm
ids, host, GPU, times, tokens, pixel cap, retries, error class). Each line is flushed and fsynced; a torn
last line (the writer was killed mid-write) is cut off on the next open, never fatal. plan.json and specs
are written atomically. The typed objects read what every earlier version wrote and write it back the same:
a key they do not declare is kept in ``extra``, and keys keep their order, so nothing is lost on the way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .atomic import atomic_write_json
from .generation import Generation
from .results import best_of, item_ok

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
LEDGER_FILE = "merged.json"  # each result file's hash after our last merge into it
ITEM_KEYS = ("id", "FileName", "QuestionType", "SubQType", "Question", "Reference", "Prediction", "Metrics",
             "ProcessingTime")  # the users' item schema: what a record gives a result file


class NotARunDir(FileNotFoundError):
    """The folder has no plan.json."""


class RunDirError(ValueError):
    """A run directory file that cannot be read as its type; the message names the file."""


@dataclass
class JsonObject:
    """A JSON object as a dataclass: declared keys are typed fields (JSON name in ``metadata["json"]``, nested
    objects through ``NESTED``), every other key is kept in ``extra``, and ``keys`` keeps the order read."""

    NESTED: ClassVar[dict[str, Any]] = {}  # field -> (read, write) for nested typed values (read takes null too)

    @classmethod
    def _declared(cls) -> dict[str, str]:
        """JSON name -> field name of the declared keys."""
        return {f.metadata.get("json", f.name): f.name for f in fields(cls)
                if f.init and f.name not in ("extra", "keys") and not f.metadata.get("local")}

    @classmethod
    def from_dict(cls, data: dict, **local):
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        declared = cls._declared()
        values = {}
        for key, value in data.items():
            if key in declared:
                name = declared[key]
                values[name] = cls.NESTED[name][0](value) if name in cls.NESTED else value
        extra = {k: v for k, v in data.items() if k not in declared}
        return cls(**values, **local, extra=extra, keys=tuple(data))

    def to_dict(self) -> dict:
        """The object as JSON: keys in the order read, then new ones (declared fields not None, then extra)."""
        out = {}
        for key, name in self._declared().items():
            value = getattr(self, name)
            if value is not None and name in self.NESTED:
                value = self.NESTED[name][1](value)
            out[key] = value
        present = [k for k in self.keys if k in out or k in self.extra]
        new = [k for k, v in out.items() if k not in self.keys and v not in (None, {}, [])]
        ordered = present + new + [k for k in self.extra if k not in self.keys]
        return {k: out[k] if k in out else self.extra[k] for k in ordered}


def _meta(json_name: str | None = None, **more) -> dict:
    return {**({"json": json_name} if json_name else {}), **more}


@dataclass
class Provenance(JsonObject):
    """Where a record comes from and how it was made (the worker writes it; merged items keep it)."""

    config: str | None = None
    run_id: str | None = None
    attempt: int | None = None
    shard: int | None = None
    slurm_job_id: str | None = None
    slurm_array_job_id: str | None = None
    slurm_array_task_id: str | None = None
    slurm_restart_count: int | None = None
    host: str | None = None
    gpu: str | None = None
    cuda_visible_devices: str | None = None
    cpus: str | None = None
    start: str | None = None
    end: str | None = None
    prompt_tokens: int | None = None
    prompt_budget: int | None = None
    truncated_to_tokens: int | None = None
    truncation: dict | None = None
    pixel_cap: int | None = None
    image_pixels: int | None = None
    retries: int | None = None
    error_class: str | None = None
    reference_from: str | None = None
    greedy: bool | None = None
    source: str | None = None  # a user's own run directory file the item came from (merge --from)
    answer_protocol: str | None = None  # the preset its answer was asked for and extracted by (protocol.py)
    generations: int | None = None  # responses it took (format re-asks included)
    table_bytes_dropped: int | None = None  # bytes of its table that are not UTF-8, dropped as the users' reading does
    max_input_tokens: int | None = None  # the users' truncation rule, when the plan chose it
    image_shrunk_for_budget: bool | None = None  # its pixel cap was lowered so that the prompt fits its budget
    sandbox_layer: str | None = None  # what confined its plotting code (scoring/sandbox.py)
    scoring_note: str | None = None  # why its plotting code scored as it did (e.g. did not run)
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


def _read_provenance(value) -> Provenance:
    return Provenance.from_dict(value) if isinstance(value, dict) else Provenance()


@dataclass
class Record(JsonObject):
    """One task's answer: the users' item schema plus its provenance (a shard file's line, a merged item)."""

    NESTED: ClassVar[dict] = {"provenance": (_read_provenance, Provenance.to_dict)}

    id: int | None = None
    file_name: str | None = field(default=None, metadata=_meta("FileName"))
    question_type: str | None = field(default=None, metadata=_meta("QuestionType"))
    sub_type: str | None = field(default=None, metadata=_meta("SubQType"))
    question: str | None = field(default=None, metadata=_meta("Question"))
    reference: Any = field(default=None, metadata=_meta("Reference"))
    prediction: Any = field(default=None, metadata=_meta("Prediction"))
    metrics: dict | None = field(default=None, metadata=_meta("Metrics"))
    processing_time: float | None = field(default=None, metadata=_meta("ProcessingTime"))
    provenance: Provenance = field(default_factory=Provenance)
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    @property
    def key(self) -> tuple[str | None, int | None]:
        """(configuration, task id): what identifies a result."""
        return self.provenance.config, self.id

    @property
    def ok(self) -> bool:
        """A success: a prediction that is not an ``[ERROR]`` record."""
        return item_ok({"Prediction": self.prediction})

    def to_item(self, with_provenance: bool = True) -> dict:
        """The item a result file gets: the users' keys that the record has, and its provenance if any."""
        data = self.to_dict()
        item = {k: data[k] for k in ITEM_KEYS if k in data}
        provenance = self.provenance.to_dict()
        if with_provenance and provenance:
            item["provenance"] = provenance
        return item


def best_records(records: list[Record]) -> dict[tuple[str, int], Record]:
    """(config, id) -> the record that counts, from records in order oldest first: success over error, then
    the newest (the rule ``results.best_items`` applies to a result file's items). Records without a
    configuration or an integer id are left out."""
    usable = (r for r in records if r.provenance.config and isinstance(r.id, int))
    return best_of((r.key, r, r.ok) for r in usable)


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
    generation: Generation = field(default_factory=Generation)  # a dict is read as one
    prompts: str | None = None  # the user's benchmark checkout; None: our default prompt set
    token_budget: int | None = None  # prompt tokens per task; None: from the device's memory
    batch_tokens: int | None = None  # tokens per batch (K/V cache, or padded prompts); None: from the device
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on the CPU
    # config name -> answer protocol preset (protocol.py); a config absent (specs written before): "hpc-rerun"
    answer_protocols: dict[str, str] = field(default_factory=dict)
    max_input_tokens: int | None = None  # the users' truncation rule (text tokens of the text message); None: ours

    def __post_init__(self):
        self.generation = Generation.from_json(self.generation)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["generation"] = self.generation.to_json()
        return out

    def write(self, run: "str | Path | RunDir") -> Path:
        """This spec at its place in the run directory, written atomically; returns its path."""
        run = run if isinstance(run, RunDir) else RunDir(run)
        path = run.spec_path(self.attempt, self.shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, path: str | Path) -> "ShardSpec":
        with open(path, "rb") as fh:
            data = json.load(fh)
        try:
            return cls(**data)
        except TypeError as err:
            raise RunDirError(f"{path}: not a shard spec this version can run ({err})") from None


def records_path(spec_path: str | Path) -> Path:
    """A shard's records file: its spec's path with ``.jsonl``."""
    return Path(spec_path).with_suffix(".jsonl")


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Every complete record of a shard file as written. With ``repair``, a torn last line is cut off."""
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


def load_records(path: str | Path, repair: bool = False) -> list[Record]:
    """A shard file's complete records, typed (lines that are not JSON objects are skipped with a warning)."""
    records = []
    for number, data in enumerate(read_records(path, repair), 1):
        if isinstance(data, dict):
            records.append(Record.from_dict(data))
        else:
            log.warning("%s: record %d is not a JSON object; skipped", path, number)
    return records


class RecordWriter:
    """Appends one JSON line per record, flushed and fsynced before the next task starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "ab")

    def append(self, record: "dict | Record") -> None:
        data = record.to_dict() if isinstance(record, Record) else record
        self._fh.write(json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n")
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


@dataclass
class ShardEntry(JsonObject):
    """A shard's line in plan.json: its spec (relative path), task count, estimated seconds, configurations."""

    number: int = field(default=0, metadata=_meta("shard"))
    spec: str = ""
    tasks: int = 0
    cost_s: float | None = None
    configs: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass
class Attempt(JsonObject):
    """One attempt's entry in plan.json and its folder ``attempt-N/``."""

    NESTED: ClassVar[dict] = {"shards": (lambda v: [ShardEntry.from_dict(s) for s in v or []],
                                         lambda v: [s.to_dict() for s in v])}

    number: int = field(default=0, metadata=_meta("attempt"))
    created: str | None = None
    shards: list[ShardEntry] = field(default_factory=list)
    jobs: dict[str, str] = field(default_factory=dict)  # shard number (as text) -> Slurm element id (``123_4``)
    executor: str | None = None  # slurm or local, once submitted
    submitted: str | None = None
    job_name: str | None = None  # the name sacct shows for its arrays
    pool_pid: int | None = None  # local: the pool process
    slurm: dict | None = None  # the Slurm options it was planned or submitted with
    causes: list[str] | None = None  # why it was planned (the states of the shards it reruns)
    cost_scale: float | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)
    run: "RunDir | None" = field(default=None, repr=False, compare=False, metadata=_meta(local=True))

    @property
    def folder(self) -> Path:
        return self.run.path / f"attempt-{self.number}"

    @property
    def submitted_at(self) -> dt.datetime | None:
        return dt.datetime.fromisoformat(self.submitted) if self.submitted else None

    def spec_file(self, shard: ShardEntry) -> Path:
        return self.run.path / shard.spec

    def records_file(self, shard: ShardEntry) -> Path:
        return records_path(self.spec_file(shard))

    def spec(self, shard: ShardEntry) -> ShardSpec:
        return ShardSpec.read(self.spec_file(shard))

    def worker_log(self, shard: ShardEntry) -> Path:
        return self.folder / f"shard-{shard.number:04d}.log"

    @property
    def pool_log(self) -> Path:
        return self.folder / "local-pool.log"

    @property
    def local_state_file(self) -> Path:
        return self.folder / "local-state.json"

    def record_submission(self, executor: str, jobs: dict, options: dict | None = None, **recorded) -> None:
        """Who runs this attempt (``slurm`` or ``local``), its job ids and when: what later steps reattach by."""
        with self.run.editing() as plan:
            entry = plan.attempts[self.number - 1]
            entry.executor, entry.jobs, entry.submitted = executor, {str(k): v for k, v in jobs.items()}, now_iso()
            for name, value in recorded.items():
                setattr(entry, name, value)
            if options is not None:
                entry.slurm = options
        for f in fields(self):
            if f.name != "run":
                setattr(self, f.name, getattr(entry, f.name))


def _read_attempts(value) -> list[Attempt]:
    return [Attempt.from_dict(a) for a in value or []]


@dataclass
class Plan(JsonObject):
    """plan.json: what the run was planned from and with, and its attempts."""

    NESTED: ClassVar[dict] = {"attempts": (_read_attempts, lambda v: [a.to_dict() for a in v])}

    run_id: str = ""
    created: str | None = None
    results_root: str | None = None
    data_root: str | None = None
    task_list: str | None = None
    settings: dict = field(default_factory=dict)  # model, prompts, generation, token_budget, ... (plan.RunSettings)
    slurm: dict = field(default_factory=dict)  # the Slurm options it was planned with
    result_files: dict[str, dict] = field(default_factory=dict)  # config -> {"path", "sha256"} when planned
    attempts: list[Attempt] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def planned_hashes(self) -> dict[str, str]:
        """config -> its result file's sha256 when the run was planned."""
        return {config: f["sha256"] for config, f in self.result_files.items()}


@dataclass
class ShardView:
    """One shard as a status round sees it: its entry, its spec's tasks and the records its file holds."""

    attempt: Attempt
    entry: ShardEntry
    tasks: list[dict]
    records: list[Record]


@dataclass
class Snapshot:
    """A run directory read once: plan.json, every spec and every shard file (what one status round needs)."""

    run: "RunDir"
    plan: Plan
    shards: list[ShardView]

    def records(self) -> list[Record]:
        """Every record of every attempt, oldest attempt first, in file order."""
        return [r for view in self.shards for r in view.records]

    def best(self) -> dict[tuple[str, int], Record]:
        return best_records(self.records())


class RunDir:
    """``logs/<run-id>/`` and its files. Each ``plan()`` and ``snapshot()`` reads afresh: other processes
    (submit, resubmit, a local pool) may have written since."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def open(cls, path: "str | Path | RunDir") -> "RunDir":
        """An existing run directory; NotARunDir (with the fix) when ``path`` has no plan.json."""
        run = path if isinstance(path, RunDir) else cls(path)
        if not run.is_run():
            raise NotARunDir(f"{run.plan_path}: not a run directory (no {PLAN_FILE}); runs live under logs/<run-id>/")
        return run

    @classmethod
    def create(cls, logs: str | Path, plan: Plan) -> "RunDir":
        """A new run directory ``logs/<plan.run_id>`` with its plan (attempts are added with ``add_attempt``)."""
        run = cls(Path(logs) / plan.run_id)
        run.path.mkdir(parents=True, exist_ok=False)
        run.save(replace(plan, created=plan.created or now_iso(), attempts=[]))
        return run

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def submitit_folder(self) -> Path:
        return self.path / "submitit"

    def is_run(self) -> bool:
        return self.plan_path.exists()

    def plan(self) -> Plan:
        if not self.is_run():
            raise NotARunDir(f"{self.plan_path}: not a run directory (no {PLAN_FILE}); runs live under logs/<run-id>/")
        try:
            plan = Plan.from_dict(json.loads(self.plan_path.read_text()))
        except (ValueError, TypeError, KeyError) as err:
            raise RunDirError(f"{self.plan_path}: not a readable plan ({err}); restore it from its run") from None
        for attempt in plan.attempts:
            attempt.run = self
        return plan

    def save(self, plan: Plan) -> None:
        atomic_write_json(self.plan_path, plan.to_dict())

    @contextmanager
    def editing(self) -> Iterator[Plan]:
        """plan.json read, changed by the block, written back atomically."""
        plan = self.plan()
        yield plan
        self.save(plan)

    def attempts(self) -> list[Attempt]:
        return self.plan().attempts

    def attempt(self, number: int | None = None) -> Attempt:
        """Attempt ``number`` (1-based); the latest when None."""
        attempts = self.attempts()
        if number is None:
            return attempts[-1]
        if not 1 <= number <= len(attempts):
            raise ValueError(f"{self.path}: no attempt {number} (it has {len(attempts)})")
        return attempts[number - 1]

    def add_attempt(self, specs: list[ShardSpec], costs: list[float], **recorded) -> Attempt:
        """Write the specs of a new attempt and its entry in plan.json; ``costs`` are the shards' seconds."""
        with self.editing() as plan:
            number = len(plan.attempts) + 1
            shards = []
            for shard_number, (spec, cost) in enumerate(zip(specs, costs)):
                spec = replace(spec, attempt=number, shard=shard_number)
                path = spec.write(self)
                shards.append(ShardEntry(number=shard_number, spec=os.path.relpath(path, self.path),
                                         tasks=len(spec.tasks), cost_s=round(cost, 1),
                                         configs=sorted({t["config"] for t in spec.tasks})))
            attempt = Attempt(number=number, created=now_iso(), shards=shards, **recorded,
                              keys=("attempt", "created", "shards", "jobs", *recorded), run=self)
            plan.attempts.append(attempt)
        return attempt

    def snapshot(self) -> Snapshot:
        """plan.json, every spec and every shard file, each read once."""
        plan = self.plan()
        shards = [ShardView(attempt, entry, attempt.spec(entry).tasks, load_records(attempt.records_file(entry)))
                  for attempt in plan.attempts for entry in attempt.shards]
        return Snapshot(self, plan, shards)

    def records(self) -> list[Record]:
        """Every record of every attempt's shard files, oldest attempt first (what "newer wins" orders by)."""
        files = sorted(self.path.glob("attempt-*/shard-*.jsonl"), key=_attempt_order)
        return [record for path in files for record in load_records(path)]

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

    def executor(self) -> str | None:
        """How the run was submitted: the latest submitted attempt's executor."""
        return next((a.executor for a in reversed(self.attempts()) if a.executor), None)


def _attempt_order(path: Path) -> tuple[int, str]:
    """attempt-2 before attempt-10 (file names sort the other way round)."""
    number = path.parent.name.removeprefix("attempt-")
    return (int(number) if number.isdigit() else 0, path.name)
