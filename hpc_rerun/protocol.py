"""The answer protocol: how a model's response becomes the stored Prediction, per the script that made a file.

Why a plan setting: a rerun completes result files whose other items came from the users' own scripts, and
those differ (see notes/users-protocol.md). Their scripts take the text after the last ``[Final Answer]:``,
or else after the last plain ``Final Answer:``; with neither, they ask again with a note appended to the
message, up to 3 generations in all, and then keep either an error text (the truncate script) or the raw
response (the default script). The default script's batch loop (text_latex, text_csv) has a shorter note,
and answers Visualization, Summary Analysis and Anomaly Analysis tasks one by one, by its sequential loop.
Answering gaps by another rule would bias the merged scores (more format failures than the run it completes).

Torch-free: the planner and the project file name presets on a login node.
"""

from __future__ import annotations

from dataclasses import dataclass

FINAL_ANSWER = "[Final Answer]:"
PLAIN_FINAL_ANSWER = "Final Answer:"
FORMAT_ERROR = "[ERROR] Failed to get proper final answer format"
# The notes as the users' scripts write them (the longer one has no closing quote).
SEQUENTIAL_NOTE = ('\nNote: Please check your output format. You do not need to do much explaining, just give the '
                   'final answer in the given format: "[Final Answer]: {answer_format}')
BATCH_NOTE = ('\nNote: Please check your output format. Just give the final answer in the format: '
              '"[Final Answer]: {answer_format}"')
# Tasks the batch loop leaves to the sequential one.
UNBATCHED_QUESTION_TYPES = ("Visualization",)
UNBATCHED_SUB_TYPES = ("Summary Analysis", "Anomaly Analysis")

KEEP_ERROR, KEEP_RAW, KEEP_FORMAT_FAILURE = "error", "raw", "format_failure"


class ProtocolError(ValueError):
    """An answer protocol name that is not a preset."""


@dataclass(frozen=True)
class AnswerProtocol:
    name: str
    markers: tuple[str, ...]  # tried in order; the answer is the stripped text after the marker's last use
    generations: int  # in all, the first included
    note: str  # appended to the message text to ask again; ``{answer_format}`` is the task's
    after_last: str  # with no marker after the last generation: KEEP_ERROR (FORMAT_ERROR, scored as a
    # prediction), KEEP_RAW (the response, scored) or KEEP_FORMAT_FAILURE (a format_failure error record)
    unbatched: str | None = None  # the preset for Visualization, Summary and Anomaly tasks (a batch loop's)

    def for_task(self, question_type: str, sub_type: str | None) -> "AnswerProtocol":
        """The protocol the script applied to a task of this type."""
        if self.unbatched and (question_type in UNBATCHED_QUESTION_TYPES or sub_type in UNBATCHED_SUB_TYPES):
            return preset(self.unbatched)
        return self

    def extract(self, response: str) -> str | None:
        """The answer, or None when no marker is there (ask again, or end by ``after_last``)."""
        for marker in self.markers:
            if marker in response:
                return response.split(marker)[-1].strip()
        return None

    def reask(self, message: str, answer_format: str) -> str:
        """The message of a second or third generation: the first message with the note."""
        return message + self.note.replace("{answer_format}", answer_format)

    def kept(self, response: str) -> str | None:
        """What is stored after the last generation found no marker; None: a format_failure error record."""
        return {KEEP_ERROR: FORMAT_ERROR, KEEP_RAW: response, KEEP_FORMAT_FAILURE: None}[self.after_last]


BOTH_MARKERS = (FINAL_ANSWER, PLAIN_FINAL_ANSWER)
PRESETS = {
    # inference_qwen3vl_local_a100_truncate.py (their OOM reruns)
    "truncate": AnswerProtocol("truncate", BOTH_MARKERS, 3, SEQUENTIAL_NOTE, KEEP_ERROR),
    # inference_qwen3vl_local_a100_default.py, sequential loop (default_pic and most full runs)
    "default-sequential": AnswerProtocol("default-sequential", BOTH_MARKERS, 3, SEQUENTIAL_NOTE, KEEP_RAW),
    # the same script's batch loop (text_latex, text_csv): 2 re-asks with the shorter note
    "default-batch": AnswerProtocol("default-batch", BOTH_MARKERS, 3, BATCH_NOTE, KEEP_RAW,
                                    unbatched="default-sequential"),
    # hpc-rerun's own strict rule (shard specs written before protocols existed ran it)
    "hpc-rerun": AnswerProtocol("hpc-rerun", (FINAL_ANSWER,), 1, "", KEEP_FORMAT_FAILURE),
}
DEFAULT_PROTOCOL = "default-sequential"  # the script most of the users' items came from
# Configurations the users' notes say another loop produced (text_latex and text_csv: the batch loop).
KNOWN_ORIGINS = {"qwen3vl_text/text_latex": "default-batch", "qwen3vl_text/text_csv": "default-batch"}
LEGACY_PROTOCOL = "hpc-rerun"


def preset(name: str) -> AnswerProtocol:
    try:
        return PRESETS[name]
    except KeyError:
        raise ProtocolError(f"unknown answer protocol {name!r}; presets: {', '.join(PRESETS)}") from None


def protocol_for(config_name: str, choices: dict[str, str], default: str = DEFAULT_PROTOCOL) -> str:
    """The preset for a configuration ``<variant>/<modality_format>``: its own entry in ``choices`` (the project
    file's), else its variant's, else the script it is known to come from, else ``default``."""
    variant = config_name.split("/", 1)[0]
    return choices.get(config_name) or choices.get(variant) or KNOWN_ORIGINS.get(config_name) or default
