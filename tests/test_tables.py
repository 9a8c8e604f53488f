"""Tables far longer than the context: one tokenisation per table, a cut that always reaches the budget,
and prompt ids equal to what the processor makes of the final text (CPU, the tiny Qwen3-VL, whose
tokenizer has Qwen's pre-tokenizer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from hpc_rerun.benchmark import Task
from hpc_rerun.inference import tables as tables_module
from hpc_rerun.inference.engine import TABLE_SLOT, Engine, PromptTooLong, Request
from hpc_rerun.inference.prompts import DEFAULT_PROMPTS, build_prompt_text
from hpc_rerun.inference.tables import TableCache
from hpc_rerun.inference.worker import run_shard
from hpc_rerun.rundir import ShardSpec, read_records, records_path

TASK = Task(1, "x", "Fact Checking", None, "Is the value in the last row larger than 12?", "Yes")
MINI_TASKS = Path(__file__).parent / "fixtures" / "realhitbench-mini" / "QA_final_sc_filled.json"


def users_rule(text: str, keep: float) -> str:
    """The users' own truncation (their rerun script): first and last ``keep`` of the lines."""
    lines = text.split("\n")
    head = int(len(lines) * keep)
    return "\n".join(lines[:head]) + f"\n... [{len(lines) - 2 * head} rows omitted] ...\n" + "\n".join(lines[-head:])


def html_table(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    rows = [f"  <tr><td class=\"s{n % 9}\">{rng.randint(0, 99999)}</td><td>{rng.random():.3f}</td></tr>"
            for n in range(lines - 2)]
    return "<table>\n" + "\n".join(rows) + "\n</table>\n"


def long_line_table(lines: int = 32, chars: int = 80_000, seed: int = 1) -> str:
    """Markdown like the users' 2.6 MB tables: few lines, each tens of thousands of characters."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        row = "|"
        while len(row) < chars:
            row += f" {rng.randint(0, 9999)}.{rng.randint(0, 99)} |"
        out.append(row)
    return "\n".join(out)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype="float32")


def table_of(tmp_path, text: str, engine: Engine, name: str = "t.html"):
    path = tmp_path / name
    path.write_text(text)
    return TableCache(engine.tokenizer).get(str(path))


@pytest.mark.parametrize("modality", ["text", "mix"])
def test_prompt_ids_are_the_processors_ids_of_the_cut_text(tmp_path, engine, modality):
    """Whole, by the users' rule, and cut inside lines: the composed ids are exactly what tokenising
    the final text gives, and never more than the budget."""
    image = Image.new("RGB", (320, 256), "white") if modality == "mix" else None
    message = build_prompt_text(TASK, modality, "html", TABLE_SLOT, DEFAULT_PROMPTS)
    seen_rules = set()
    for text in (html_table(3000), long_line_table(8, 20_000), "a,b\n\n1,2\n3,4\n" * 50,
                 "| Región — 就业人数 | Émploi 12,5 € |\n" * 400):
        table = table_of(tmp_path, text, engine)
        for budget in (10**7, max(table.tokens // 2, 1024), max(table.tokens // 6, 1024), 1024):
            request = engine.prepare(message, image, {"max_new_tokens": 8}, budget, table)
            expected = engine._process([request])["input_ids"][0].tolist()
            assert request.prompt.input_ids.tolist() == expected, (budget, request.cut.rule)
            assert request.prompt_tokens == len(expected) <= budget
            if image is not None and budget == 1024:  # patches and 3-D rope positions as the processor's too
                reference = engine._prompt(Request(request.text, image, request.generation))
                assert torch.equal(request.prompt.positions, reference.positions)
                assert torch.equal(request.prompt.pixel_values, reference.pixel_values)
                assert torch.equal(request.prompt.image_grid_thw, reference.image_grid_thw)
            seen_rules.add(request.cut.rule)
    assert seen_rules == {None, "lines", "tokens"}


def test_the_users_rule_is_kept_while_it_reaches_the_budget(tmp_path, engine):
    text = html_table(3000)
    table = table_of(tmp_path, text, engine)
    message = build_prompt_text(TASK, "text", "html", TABLE_SLOT, DEFAULT_PROMPTS)
    request = engine.prepare(message, None, {"max_new_tokens": 8}, table.tokens // 2, table)
    assert request.cut.rule == "lines" and request.cut.keep_share == pytest.approx(0.35 * 0.8**2)
    assert users_rule(text, request.cut.keep_share) in request.text, "the table as the users' script cuts it"


def test_any_table_fits_any_budget_from_1024_tokens_with_one_tokenisation(tmp_path, engine, monkeypatch):
    """A 32-line table of 80K-character lines cannot be cut by lines: the cut goes inside them. The
    table is tokenised once; each prompt tokenises only a few lines more, never the table again."""
    builds, tokenised = [], []
    real_build, real_tokens = tables_module.TokenizedTable.build.__func__, engine._tokens
    monkeypatch.setattr(tables_module.TokenizedTable, "build",
                        classmethod(lambda cls, path, tok: builds.append(path) or real_build(cls, path, tok)))
    monkeypatch.setattr(engine, "_tokens", lambda text: tokenised.append(len(text)) or real_tokens(text))
    text = long_line_table()
    cache = TableCache(engine.tokenizer)
    path = tmp_path / "wide.md"
    path.write_text(text)
    message = build_prompt_text(TASK, "text", "markdown", TABLE_SLOT, DEFAULT_PROMPTS)
    for budget in (1024, 4096, 65536):
        request = engine.prepare(message, None, {"max_new_tokens": 8}, budget, cache.get(str(path)))
        assert request.prompt_tokens <= budget and request.cut.rule == "tokens"
        assert request.prompt_tokens > budget - 32, "the room is used, not thrown away"
    assert builds == [str(path)], "one tokenisation of the table for every cut"
    assert max(tokenised) < 3 * 80_000 < len(text), "only the lines at the joins are tokenised again"
    with pytest.raises(PromptTooLong):
        engine.prepare(message, None, {"max_new_tokens": 8}, 20, cache.get(str(path)))


def test_context_caps_the_budget(tmp_path, tiny_model_dir):
    """Whatever the card holds, a prompt never exceeds the model's context less the new tokens."""
    small = tmp_path / "small-context"
    small.mkdir()
    for f in tiny_model_dir.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.loads((small / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 3000
    (small / "config.json").write_text(json.dumps(config))
    engine = Engine(str(small), dtype="float32")
    assert engine.token_budget({"max_new_tokens": 1000}) == 2000
    assert engine.token_budget({"max_new_tokens": 1000}, requested=65536) == 2000, "--token-budget cannot pass it"


@pytest.mark.parametrize("budget", [1024, 16384])
def test_a_shard_of_huge_tables_never_ends_in_oom_text(tmp_path, tiny_model_dir, budget, monkeypatch):
    """The worker on the shape of the real gaps: a 90K-line HTML table and a 32-line table of 80K-character
    lines, three tasks each, at any --token-budget: every task answered within its budget, the cut
    recorded, each table tokenised once."""
    data = tmp_path / "data"
    (data / "html").mkdir(parents=True)
    (data / "markdown").mkdir()
    (data / "html" / "society-table10.html").write_text(html_table(90_000))
    (data / "markdown" / "science-table32.md").write_text(long_line_table())
    queries = json.loads(MINI_TASKS.read_text())["queries"]
    ids = {"society-table10": [], "science-table32": []}
    for q in queries:
        if q["FileName"] in ids and q["QuestionType"] != "Visualization" and len(ids[q["FileName"]]) < 3:
            ids[q["FileName"]].append(q["id"])
    tasks = [("qwen3vl_text/text_html", i) for i in ids["society-table10"]] + [
        ("qwen3vl_text/text_markdown", i) for i in ids["science-table32"]]
    spec = ShardSpec(run_id="t", attempt=1, shard=0, model=str(tiny_model_dir), data_root=str(data),
                     task_list=str(MINI_TASKS), tasks=[{"config": c, "id": i} for c, i in tasks], configs={},
                     generation={"do_sample": False, "max_new_tokens": 4}, token_budget=budget).write(tmp_path / "run")
    builds = []
    real = tables_module.TokenizedTable.build.__func__
    monkeypatch.setattr(tables_module.TokenizedTable, "build",
                        classmethod(lambda cls, path, tok: builds.append(path) or real(cls, path, tok)))
    run_shard(spec)
    records = read_records(records_path(spec))
    assert len(records) == 6
    for record in records:
        provenance = record["provenance"]
        assert provenance["error_class"] in (None, "format_failure"), record["Prediction"]  # a random model
        assert provenance["truncated_to_tokens"] <= provenance["prompt_budget"] == budget
        assert provenance["truncation"]["table_tokens_kept"] < provenance["truncation"]["table_tokens"]
    assert len(builds) == len(set(builds)) == 2, "each table tokenised once for its three tasks"


MINI_DATA = Path(__file__).parent / "fixtures" / "realhitbench-mini" / "data"


def users_reading(path) -> str:
    """How the users' scripts read a table (utils/common_util.py's read_file)."""
    with open(path, encoding="utf-8", errors="ignore") as fh:  # text mode: universal newlines
        return fh.read()


def users_ids(engine: Engine, message: str) -> list[int]:
    """Their script's ids of a text message: ``processor.apply_chat_template(..., tokenize=True)``."""
    conversation = [{"role": "user", "content": [{"type": "text", "text": message}]}]
    return engine.processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"][0]


def test_a_crlf_latex_table_and_a_non_utf8_table_give_the_ids_the_users_reading_gives(tmp_path, engine):
    """A real LaTeX table with CRLF line ends (594 of the benchmark's), and the same bytes with bytes that are
    not UTF-8 and a lone CR in it (13 such tables were answered): the text is theirs, the dropped bytes are
    counted, and the prompt ids are those their script tokenises."""
    crlf = MINI_DATA / "latex" / "economy-table14.txt"
    raw = crlf.read_bytes()
    assert b"\r\n" in raw
    broken = tmp_path / "broken.txt"
    middle = raw.index(b"\r\n", len(raw) // 2)
    broken.write_bytes(raw[:100] + b"\xff\xfe" + raw[100:middle] + b"\r" + b"\xe9t\xc3" + raw[middle:] + b"\x80")
    message = build_prompt_text(TASK, "text", "latex", TABLE_SLOT, DEFAULT_PROMPTS)
    for path, dropped in ((crlf, 0), (broken, 5)):
        read = tables_module.read_table(path)
        assert read.text == users_reading(path) and "\r" not in read.text
        assert read.bytes_dropped == dropped
        table = TableCache(engine.tokenizer).get(str(path))
        assert table.bytes_dropped == dropped
        request = engine.prepare(message, None, {"max_new_tokens": 8}, 10**7, table)
        assert request.cut.rule is None
        theirs = message.replace(TABLE_SLOT, users_reading(path))
        assert request.prompt.input_ids.tolist() == users_ids(engine, theirs)


def their_truncation(engine: Engine, message: str, table: str, limit: int) -> str:
    """A plain re-implementation of the users' truncate_text_if_needed (their truncate script): count the
    chat-templated text message; over ``limit``, keep the first and last 35% of the table's lines around a
    marker element, joined with "\\n", then x0.8 (at least 1 line each end) up to 5 more times; keep the last."""
    full = message.replace(TABLE_SLOT, table)
    if len(users_ids(engine, full)) <= limit:
        return full
    lines = table.split("\n")
    n, keep = len(lines), 0.35
    head = int(n * keep)
    cut = lines[:head] + [f"\n... [{n - head - head} rows omitted] ...\n"] + lines[-head:]
    text = full.replace(table, "\n".join(cut))
    attempts = 0
    while len(users_ids(engine, text)) > limit and attempts < 5:
        attempts += 1
        keep *= 0.8
        head = max(1, int(n * keep))
        cut = lines[:head] + [f"\n... [{n - head - head} rows omitted] ...\n"] + lines[-head:]
        text = full.replace(table, "\n".join(cut))
    return text


def test_max_input_tokens_reproduces_the_users_cut_and_marker(tmp_path, engine):
    """``--max-input-tokens N`` on a real long table of the fixture (employment-table01.html, 934 lines): the
    message is their script's, character for character, and its ids are the tokeniser's. Their 200,000 on the
    8B tokenizer and a few thousand on the tiny one take the same path; the limits here hit each step of it:
    the table whole, their first cut, a later step, and their steps run out (the last kept, still over N)."""
    path = MINI_DATA / "html" / "employment-table01.html"
    table = TableCache(engine.tokenizer).get(str(path))
    message = build_prompt_text(TASK, "text", "html", TABLE_SLOT, DEFAULT_PROMPTS)
    whole = len(users_ids(engine, message.replace(TABLE_SLOT, table.text)))
    outcomes = set()
    for limit in (whole, whole - 1, whole // 3, 300):
        request = engine.prepare(message, None, {"max_new_tokens": 8}, 10**7, table, max_input_tokens=limit)
        theirs = their_truncation(engine, message, table.text, limit)
        assert request.text == theirs, limit
        assert request.prompt.input_ids.tolist() == users_ids(engine, theirs)
        if request.cut.rule:
            assert "\n\n... [" in request.text and "rows omitted] ...\n\n" in request.text, "between blank lines"
        outcomes.add((request.cut.rule, request.cut.keep_share, request.prompt_tokens <= limit))
    assert outcomes == {(None, None, True), ("users", 0.35, True), ("users", round(0.35 * 0.8**4, 4), True),
                        ("users", round(0.35 * 0.8**5, 4), False)}, outcomes
