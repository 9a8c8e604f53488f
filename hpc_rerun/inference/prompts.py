"""Prompts exactly as the users' runs built them, from their own prompt modules or our default set.

A prompt module (``inference/answer_prompt_llm.py`` for text, ``_mlm.py`` for image, ``_mix.py`` for
mix, in the user's benchmark checkout) defines ``Answer_Prompt`` (keyed by QuestionType, by SubQType
for Data Analysis) and ``User_Prompt`` (with ``{Table}``, ``{Question}``, ``{Answer_format}``).
The message is the task prompt, a newline, and the user prompt; the image comes first.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..benchmark import BenchmarkError, Task

MODULE_FILES = {"text": "answer_prompt_llm.py", "image": "answer_prompt_mlm.py", "mix": "answer_prompt_mix.py"}
IMAGE_PLACEHOLDER = "[See the table image]"
ANSWER_FORMATS = {
    "Exploratory Analysis": "CorrelationRelation, CorrelationCoefficient",
    "Visualization": "import pandas as pd \n import matplotlib.pyplot as plt \n ... plt.show()",
}
DEFAULT_ANSWER_FORMAT = "AnswerName1, AnswerName2..."


@dataclass(frozen=True)
class PromptSet:
    answer_prompt: dict[str, str]
    user_prompt: str
    source: str  # where it came from, for provenance


def _default_prompt_set() -> PromptSet:
    """Our own short prompts, for the demo and tests (not the users' wording)."""
    base = ("You answer questions about a table{where}. Think it through, then end with one line: "
            "[Final Answer]: {what}")
    kinds = {
        "Fact Checking": "the answer (numbers or names, as short as possible; Yes or No for a yes/no question)",
        "Numerical Reasoning": "the number(s), decimals kept to two places",
        "Structure Comprehending": "the answer, as short as possible",
        "Rudimentary Analysis": "the result, as short as possible",
        "Predictive Analysis": "the prediction or trend, as short as possible",
        "Exploratory Analysis": "the correlation relation and coefficient",
        "Summary Analysis": "a short summary of the table",
        "Anomaly Analysis": "a short conclusion about the anomaly",
        "Visualization": "python code that starts with the import lines shown and ends with plt.show(); "
                         "the table is in table.xlsx",
    }
    answer = {k: base.format(where=" given in {format} format", what=v) for k, v in kinds.items()}
    user = "Table:\n{Table}\n\nQuestion: {Question}\nAnswer format: [Final Answer]: {Answer_format}"
    return PromptSet(answer, user, "hpc-rerun default")


DEFAULT_PROMPTS = _default_prompt_set()


def load_prompt_set(checkout: str | Path | None, modality: str) -> PromptSet:
    """The user's prompt module for this modality from their benchmark checkout, or our default."""
    if checkout is None:
        return DEFAULT_PROMPTS
    path = Path(checkout) / "inference" / MODULE_FILES[modality]
    if not path.exists():
        raise BenchmarkError(f"{path}: prompt module not found; point --prompts at the benchmark checkout "
                             "that holds inference/answer_prompt_*.py")
    spec = importlib.util.spec_from_file_location(f"hpc_rerun_user_prompts_{modality}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise BenchmarkError(f"{path}: cannot load prompt module ({type(err).__name__}: {err})") from None
    if not isinstance(getattr(module, "Answer_Prompt", None), dict) or not isinstance(
            getattr(module, "User_Prompt", None), str):
        raise BenchmarkError(f"{path}: needs a dict Answer_Prompt and a string User_Prompt")
    return PromptSet(module.Answer_Prompt, module.User_Prompt, str(path))


def prompt_key(task: Task) -> str:
    return task.sub_type if task.question_type == "Data Analysis" else task.question_type


def build_prompt_text(task: Task, modality: str, fmt: str | None, table_text: str | None, prompts: PromptSet) -> str:
    """The message text for one task (the image, if any, goes before it in the content list)."""
    key = prompt_key(task)
    try:
        task_prompt = prompts.answer_prompt[key]
    except KeyError:
        raise BenchmarkError(f"prompt set {prompts.source} has no Answer_Prompt for {key!r}") from None
    if modality == "text" or prompts is DEFAULT_PROMPTS:
        task_prompt = task_prompt.replace("{format}", fmt or "image")
    table = IMAGE_PLACEHOLDER if modality == "image" else table_text
    user = prompts.user_prompt.format(Table=table, Question=task.question, Answer_format=answer_format(task))
    return task_prompt + "\n" + user


def answer_format(task: Task) -> str:
    """The ``{Answer_format}`` of a task's prompt (and of the format re-ask's note)."""
    return ANSWER_FORMATS.get(prompt_key(task), DEFAULT_ANSWER_FORMAT)
