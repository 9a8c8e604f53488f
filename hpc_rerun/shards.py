"""Shard specs (what one array element runs) and shard files (append-only JSONL, one record per task).

A spec is ``<run>/attempt-N/shard-NNNN.json``; its records go to the same path with ``.jsonl``.
Records are the original item schema plus ``provenance`` (config, run, attempt, shard, Slurm ids,
host, GPU, times, tokens, pixel cap, retries, error class). Each line is flushed and fsynced; a torn
last line (the writer was killed mid-write) is cut off on the next open, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class ShardSpec:
    run_id: str
    attempt: int
    shard: int
    model: str
    data_root: str
    task_list: str
    tasks: list[dict]  # [{"config": "<variant>/<modality_format>", "id": int}, ...]
    configs: dict[str, dict]  # config name -> {"min_pixels", "max_pixels"} (its variant's settings)
    generation: dict = field(default_factory=lambda: {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 4096})
    prompts: str | None = None  # the user's benchmark checkout; None: our default prompt set
    token_budget: int | None = None  # prompt tokens per task; None: from the device's memory
    batch_tokens: int | None = None  # tokens per batch (K/V cache, or padded prompts); None: from the device
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on the CPU

    @property
    def path_stem(self) -> str:
        return f"shard-{self.shard:04d}"

    def write(self, run_dir: Path) -> Path:
        path = run_dir / f"attempt-{self.attempt}" / f"{self.path_stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "ShardSpec":
        with open(path, "rb") as fh:
            return cls(**json.load(fh))


def records_path(spec_path: str | Path) -> Path:
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
