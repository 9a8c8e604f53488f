"""One array element = one shard: load the model once, answer every task, never lose work.

Each task ends as exactly one record in the shard file, success or classified error. The worker
resumes past what the file already holds (after SIGKILL, time limit or preemption), reads and tokenises
each table once, cuts prompts to the token budget (the users' rule, then inside lines: tables.py),
prepares prompts on threads while the GPU works, walks an OOM ladder per task, and never lets one
task's failure stop the shard.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..benchmark import ERROR_PREFIX, Config, Task, load_tasks, required_files
from ..pixels import DEFAULT_MAX_PIXELS, SMALLEST_IMAGE_PIXELS, TOKEN_PIXELS
from ..protocol import LEGACY_PROTOCOL, AnswerProtocol, preset
from ..rundir import RecordWriter, ShardSpec, load_records, records_path
from ..scan import SourceIndex, missing_inputs
from ..scoring.metrics import GPT_EVAL_PLACEHOLDER, JUDGED_SUBTYPES, Scored, score_answer
from .engine import TABLE_SLOT, BatchStream, Engine, PromptTooLong, Request
from .prompts import PromptSet, answer_format, build_prompt_text, load_prompt_set
from .signals import safe_point
from .tables import TableCache

log = logging.getLogger(__name__)

OOM_RETRIES = 3
# An image beside a table that had to be cut takes at most this share of the prompt budget, or it is shrunk
# (a table cut to nothing beside a 16K-token image answers nothing).
IMAGE_SHARE_BESIDE_CUT_TABLE = 0.5
# The processor refuses images whose sides differ more than this (transformers' smart_resize).
MAX_ASPECT_RATIO = 200


class TaskFailure(Exception):
    """A task that ends as an ``[ERROR]`` record of a known class."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class
        self.prediction = f"{ERROR_PREFIX} {message}"


@dataclass
class TaskInput:
    config: Config
    task: Task
    table_path: str | None  # the table text file (text and mix); read and tokenised through the shard's cache
    image: Image.Image | None
    token_budget: int
    min_pixels: int | None
    max_pixels: int | None
    retries: int = 0
    prompts: PromptSet | None = None
    request: Request | None = None
    suffix_room: int = 0  # tokens after the table for the longest question of its group (share_key)
    protocol: AnswerProtocol | None = None  # how its responses become the Prediction (the spec's, for its type)
    max_input_tokens: int | None = None  # the users' truncation rule (the spec's); None: ours
    generations: int = 0  # responses it has had
    seconds: float = 0.0  # its share of the generate calls so far
    image_shrunk_for_budget: bool = False  # max_pixels was lowered so that the prompt fits its budget
    scored: Scored | None = None  # how its answer was scored (the sandbox layer, why code did not run)

    @property
    def share_key(self) -> tuple:
        """Tasks of one configuration, table and question type: their prompts are equal up to the question."""
        return self.config.name, self.task.file_name, self.task.question_type

    def prompt_text(self, reask: bool | None = None) -> str:
        """The message text; a re-ask (by default: once it has had a response) has the protocol's note."""
        text = build_prompt_text(self.task, self.config.modality, self.config.format,
                                 TABLE_SLOT if self.table_path else None, self.prompts)
        if self.generations > 0 if reask is None else reask:
            text = self.protocol.reask(text, answer_format(self.task))
        return text


def source_path(data_root: Path, relpath: str) -> Path:
    """The data file, refusing a FileName that would leave the data root (checked on the path's text,
    so a data root whose folders are symbolic links still works)."""
    root = os.path.normpath(os.path.abspath(data_root))
    path = os.path.normpath(os.path.join(root, relpath))
    if os.path.commonpath([root, path]) != root:
        raise TaskFailure("bad_input", f"Bad input: file name escapes the data root: {relpath}")
    return Path(path)


def load_input(config: Config, task: Task, data_root: Path, settings: dict, token_budget: int,
               index: SourceIndex, images: dict[Path, Image.Image]) -> TaskInput:
    """Open the image and find the table text a task needs (each image once for the shard: ``images`` maps a
    path to its pixels); missing or broken inputs never reach the model."""
    paths = {rel: source_path(data_root, rel) for rel in required_files(task, config)}
    missing = missing_inputs(index, task, config)  # what the scan found runnable, by the same rule
    if missing:
        raise TaskFailure("missing_input", f"File not found: {paths[missing[0]]}")
    table_path = image = None
    for rel, path in paths.items():
        if rel.startswith("image/"):
            if path not in images:  # decoded once for all the tasks of the shard that show it
                images[path] = open_image(path)
            image = images[path]
        elif not rel.startswith("tables/"):
            table_path = str(path)  # any bytes: read as the users read it
    return TaskInput(config, task, table_path, image, token_budget,
                     settings.get("min_pixels"), settings.get("max_pixels"))


def open_image(path: Path) -> Image.Image:
    """The image's RGB pixels as transformers' ``load_image`` gives them to the processor."""
    try:
        with Image.open(path) as opened:
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise TaskFailure("bad_input", f"Bad input: cannot decode image {path} ({err})") from None
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise TaskFailure("bad_input", f"Bad input: image {path} is {image.size[0]}x{image.size[1]} px, sides "
                          f"more than {MAX_ASPECT_RATIO}-fold apart, which Qwen3-VL's processor refuses; "
                          "crop or pad it")
    return image


def prepare(engine: Engine, ti: TaskInput, generation: dict, tables: TableCache) -> Request:
    """The request within the task's token budget (its table cut to fit, its image shrunk if need be), or a
    classified failure."""
    config = ti.config
    try:
        table = tables.get(ti.table_path) if ti.table_path else None
        ti.request = prepare_within_budget(engine, ti, generation, table)
    except PromptTooLong as err:
        if config.modality == "image":
            raise TaskFailure("oom_image", f"OOM: Image too large ({ti.image.size})") from None
        raise TaskFailure("oom_text", f"OOM: Text too large ({err.full_tokens} tokens)") from None
    finally:
        if ti.table_path:
            tables.release(ti.table_path)
    return ti.request


def prepare_within_budget(engine: Engine, ti: TaskInput, generation: dict, table) -> Request:
    """The prompt with the task's image at its pixel cap; when the image leaves the prompt no room, or leaves
    a table that had to be cut less than its share, the cap is halved below the image it gave (as the OOM
    ladder does) and the prompt made again. The cap used and the shrink are recorded on the item.
    Raises PromptTooLong when even the smallest image leaves no room."""
    smaller_than = None
    while True:
        image = engine.fit_image(ti.image, ti.min_pixels, ti.max_pixels) if ti.image is not None else None
        pixels = image.size[0] * image.size[1] if image is not None else 0
        shrinkable = (image is not None and pixels > SMALLEST_IMAGE_PIXELS
                      and (smaller_than is None or pixels < smaller_than))
        try:
            request = engine.prepare(ti.prompt_text(), image, generation, ti.token_budget, table, ti.share_key,
                                     ti.suffix_room, ti.max_input_tokens)
        except PromptTooLong:
            if not shrinkable:
                raise
        else:
            table_cut = request.cut is not None and bool(request.cut.rule)
            image_share = pixels // TOKEN_PIXELS**2 / ti.token_budget
            if not (shrinkable and table_cut and image_share > IMAGE_SHARE_BESIDE_CUT_TABLE):
                return request
        smaller_than = pixels
        ti.max_pixels = max(pixels // 2, SMALLEST_IMAGE_PIXELS)
        ti.image_shrunk_for_budget = True


def error_metrics(task: Task) -> dict:
    if task.question_type == "Visualization":
        return {"ECR": False, "Pass": "None"}
    if task.sub_type in JUDGED_SUBTYPES:
        return dict(GPT_EVAL_PLACEHOLDER)
    return {"F1": 0.0, "EM": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}


class ShardRunner:
    def __init__(self, spec_path: str | Path):
        self.spec_path = Path(spec_path)
        self.spec = ShardSpec.read(spec_path)
        self.data_root = Path(self.spec.data_root)
        self.generation = self.spec.generation.hf_kwargs()  # the plan's, the same in every attempt
        self.engine: Engine | None = None
        self.tables: TableCache | None = None
        self.stream: BatchStream | None = None
        self.gpu = "cpu"

    def provenance(self, config: Config, started: float, error_class: str | None, ti: TaskInput | None = None) -> dict:
        request = ti.request if ti else None
        env = os.environ
        return {
            "config": config.name,
            "run_id": self.spec.run_id,
            "attempt": self.spec.attempt,
            "shard": self.spec.shard,
            "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
            "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
            "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", 0)),
            "host": socket.gethostname(),
            "gpu": self.gpu,
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),  # the GPU the scheduler or pool gave it
            "cpus": cpu_ranges(os.sched_getaffinity(0)),  # the CPUs it may use, e.g. "0-3"
            "start": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "end": dt.datetime.now().isoformat(timespec="seconds"),
            "prompt_tokens": request.extras.get("full_tokens") if request else None,
            "prompt_budget": ti.token_budget if ti else None,
            "truncated_to_tokens": request.prompt_tokens if request and request.cut and request.cut.rule else None,
            "truncation": request.cut.record() if request and request.cut and request.cut.rule else None,
            "pixel_cap": (ti.max_pixels or DEFAULT_MAX_PIXELS) if request and request.image else None,
            "image_pixels": (request.image.size[0] * request.image.size[1]) if request and request.image else None,
            "image_shrunk_for_budget": ti.image_shrunk_for_budget if request and request.image else None,
            "retries": ti.retries if ti else 0,
            "table_bytes_dropped": request.cut.table.bytes_dropped if request and request.cut else None,
            "max_input_tokens": self.spec.max_input_tokens,  # the users' truncation rule, when chosen
            "answer_protocol": ti.protocol.name if ti and ti.protocol else None,
            "generations": ti.generations if ti else 0,
            "error_class": error_class,
            "reference_from": self.spec.task_list,  # the Reference it was scored against (some stored items differ)
            "greedy": not self.generation.get("do_sample", False),
            "sandbox_layer": ti.scored.sandbox_layer if ti and ti.scored else None,  # Visualization code's isolation
            "scoring_note": ti.scored.note if ti and ti.scored else None,  # e.g. why its code scored ECR false
        }

    def record(self, task: Task, config: Config, prediction: str, metrics: dict, seconds: float, started: float,
               error_class: str | None, ti: TaskInput | None = None) -> dict:
        return {
            "id": task.id, "FileName": task.file_name, "QuestionType": task.question_type,
            "SubQType": task.sub_type, "Question": task.question, "Reference": task.reference,
            "Prediction": prediction, "Metrics": metrics, "ProcessingTime": round(seconds, 2),
            "provenance": self.provenance(config, started, error_class, ti),
        }

    def fail(self, writer: RecordWriter, config: Config, task: Task, failure: TaskFailure, started: float,
             ti: TaskInput | None = None) -> None:
        log.info("task %s/%s: %s", config.name, task.id, failure.prediction)
        writer.append(self.record(task, config, failure.prediction, error_metrics(task), time.time() - started,
                                  started, failure.error_class, ti))

    def run(self) -> dict:
        out = records_path(self.spec_path)
        done = {record.key for record in load_records(out, repair=True)}
        todo = [t for t in self.spec.tasks if (t["config"], t["id"]) not in done]
        summary = {"shard": self.spec.shard, "total": len(self.spec.tasks),
                   "already_done": len(self.spec.tasks) - len(todo)}
        if not todo:
            return summary
        tasks = load_tasks(self.spec.task_list)
        Image.MAX_IMAGE_PIXELS = None  # 233 MP tables exist; fit_image caps what reaches the model
        with RecordWriter(out) as writer:
            inputs = self.load_inputs(todo, tasks, writer)
            if inputs:
                self.engine = Engine(self.spec.model, self.spec.dtype)
                safe_point()  # a signal that came while the model loaded
                self.gpu = self.engine.device_name
                self.tables = TableCache(self.engine.tokenizer)
                # --token-budget or what the card holds, never past the model's context less the new tokens.
                budget = self.engine.token_budget(self.generation, requested=self.spec.token_budget)
                prompt_sets = {}
                for ti in inputs:
                    ti.token_budget = min(ti.token_budget or budget, budget)
                    if ti.config.modality not in prompt_sets:
                        prompt_sets[ti.config.modality] = load_prompt_set(self.spec.prompts, ti.config.modality)
                    ti.prompts = prompt_sets[ti.config.modality]
                    name = self.spec.answer_protocols.get(ti.config.name, LEGACY_PROTOCOL)
                    ti.protocol = preset(name).for_task(ti.task.question_type, ti.task.sub_type)
                    ti.max_input_tokens = self.spec.max_input_tokens
                    if ti.table_path:
                        self.tables.expect(ti.table_path)
                self.reserve_suffixes(inputs)
                # Tasks of one table or image together: its tokenisation or fitted image serves them while cached.
                inputs.sort(key=lambda ti: (ti.table_path or "", ti.config.name, ti.task.file_name,
                                            ti.task.question_type, ti.task.id))
                self.stream = self.engine.stream_batches(inputs, self.prepare, lambda ti, err: self.not_prepared(
                    writer, ti, err), self.generation, self.spec.batch_tokens)
                for batch in self.stream:  # a format re-ask joins a later batch (write_answer)
                    self.run_batch(batch, writer)
                    safe_point()  # the batch's answers are written
        summary["written"] = len(todo)
        return summary

    def prepare(self, ti: TaskInput) -> Request:
        if ti.table_path and ti.generations + 1 < ti.protocol.generations:
            self.tables.expect(ti.table_path)  # kept for a re-ask, never tokenised again (released in write_answer)
        return prepare(self.engine, ti, self.generation, self.tables)

    def reserve_suffixes(self, inputs: list[TaskInput]) -> None:
        """Each task's table is cut leaving room for the longest question of its group, so the group's
        prompts are equal up to the question and the engine prefills that part once."""
        rooms: dict[tuple, int] = {}
        for ti in inputs:
            if ti.table_path:
                # with the note where the protocol may ask again: a re-asked prompt keeps the same cut
                suffix = self.engine.suffix_tokens(ti.prompt_text(reask=ti.protocol.generations > 1), ti.image)
                rooms[ti.share_key] = max(rooms.get(ti.share_key, 0), suffix)
        for ti in inputs:
            ti.suffix_room = rooms.get(ti.share_key, 0)

    def not_prepared(self, writer: RecordWriter, ti: TaskInput, err: Exception) -> None:
        """A task whose prompt could not be made: a classified error record; the shard goes on."""
        if not isinstance(err, TaskFailure):  # one task's broken input never stops the shard
            log.error("task %s/%s: preparing the prompt failed", ti.config.name, ti.task.id, exc_info=err)
            err = TaskFailure("other", f"{type(err).__name__}: {err}")
        self.fail(writer, ti.config, ti.task, err, time.time(), ti)

    def load_inputs(self, todo: list[dict], tasks: dict[int, Task], writer: RecordWriter) -> list[TaskInput]:
        inputs, index, images = [], SourceIndex(self.data_root), {}
        for entry in todo:
            config, started = Config.parse(entry["config"]), time.time()
            task = tasks.get(entry["id"])
            if task is None:
                log.error("task %s is not in %s; skipped", entry["id"], self.spec.task_list)
                continue
            # Per-task overrides come from resubmit's escalation (a smaller budget or pixel cap after OOM).
            settings = {**self.spec.configs.get(config.name, {}),
                        **{k: entry[k] for k in ("min_pixels", "max_pixels") if k in entry}}
            try:
                inputs.append(load_input(config, task, self.data_root, settings, entry.get("token_budget") or 0,
                                         index, images))
            except TaskFailure as failure:
                self.fail(writer, config, task, failure, started)
        return inputs

    def run_batch(self, batch: list[TaskInput], writer: RecordWriter) -> None:
        """Generate a batch; an OOM splits it, a lone task walks the OOM ladder; other errors isolate."""
        started = time.time()
        try:
            responses = self.engine.generate_encoded(self.engine.encode([ti.request for ti in batch]))
        except torch.OutOfMemoryError:
            self.engine.free_memory()
            if len(batch) > 1:
                half = len(batch) // 2
                self.run_batch(batch[:half], writer)
                self.run_batch(batch[half:], writer)
            else:
                self.retry_smaller(batch[0], writer, started)
            return
        except Exception as err:  # a broken task must not stop the shard
            if len(batch) > 1:
                for ti in batch:
                    self.run_batch([ti], writer)
                return
            log.exception("task %s/%s failed", batch[0].config.name, batch[0].task.id)
            self.fail(writer, batch[0].config, batch[0].task,
                      TaskFailure("other", f"{type(err).__name__}: {err}"), started, batch[0])
            return
        seconds = (time.time() - started) / len(batch)
        for ti, response in zip(batch, responses):
            self.write_answer(ti, response, seconds, started, writer)

    def retry_smaller(self, ti: TaskInput, writer: RecordWriter, started: float) -> None:
        """Halve the token budget (text) or the pixel cap (image), or both (mix), up to 3 times."""
        if ti.retries >= OOM_RETRIES:
            failure = (TaskFailure("oom_image", f"OOM: Image too large ({ti.image.size})")
                       if ti.config.modality == "image" else
                       TaskFailure("oom_text", f"OOM: Text too large ({ti.request.extras['full_tokens']} tokens)"))
            self.fail(writer, ti.config, ti.task, failure, started, ti)
            return
        ti.retries += 1
        if ti.config.modality in ("text", "mix"):
            ti.token_budget = max(ti.request.prompt_tokens // 2, 1)
        if ti.image is not None:
            width, height = ti.request.image.size
            ti.max_pixels = max(width * height // 2, SMALLEST_IMAGE_PIXELS)  # the minimum follows (pixel_limits)
        log.warning("task %s/%s: out of memory, retry %d with budget %d tokens / cap %s px", ti.config.name,
                    ti.task.id, ti.retries, ti.token_budget, ti.max_pixels)
        if ti.table_path:
            self.tables.expect(ti.table_path)
        try:
            self.prepare(ti)
        except TaskFailure as failure:
            self.fail(writer, ti.config, ti.task, failure, started, ti)
            return
        self.run_batch([ti], writer)

    def write_answer(self, ti: TaskInput, response: str, seconds: float, started: float, writer: RecordWriter) -> None:
        """The response as the task's protocol stores it: its answer; or, with no marker, the task asked again
        (it joins a later batch) while it has generations left, and after the last the protocol's keep."""
        ti.generations += 1
        ti.seconds += seconds
        answer = ti.protocol.extract(response)
        if answer is None and ti.generations < ti.protocol.generations:
            self.stream.requeue(ti)
            return
        if ti.table_path and ti.generations < ti.protocol.generations:
            self.tables.release(ti.table_path)  # answered before its last try: the table kept for it goes
        no_marker = answer is None
        if no_marker:
            answer = ti.protocol.kept(response)
        if answer is None:
            failure = TaskFailure("format_failure", "Failed to get proper final answer format")
            self.fail(writer, ti.config, ti.task, failure, started, ti)
            return
        try:
            ti.scored = score_answer(ti.task, answer, self.data_root)
        except Exception as err:  # e.g. the plotting sandbox cannot run: say so on the item, keep going
            log.exception("task %s/%s: scoring failed", ti.config.name, ti.task.id)
            self.fail(writer, ti.config, ti.task, TaskFailure("other", f"Scoring failed: {type(err).__name__}: {err}"),
                      started, ti)
            return
        error_class = "format_failure" if no_marker and answer.startswith(ERROR_PREFIX) else None  # truncate's keep
        writer.append(self.record(ti.task, ti.config, answer, ti.scored.metrics, ti.seconds, started, error_class, ti))



def cpu_ranges(cpus) -> str:
    """``{0, 1, 2, 3, 8}`` -> ``"0-3,8"``."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def run_shard(spec_path: str | Path) -> dict:
    """Entry point for one array element (and ``hpc-rerun worker``)."""
    return ShardRunner(spec_path).run()
