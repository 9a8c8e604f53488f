"""Table text tokenised once per shard, cut to any token budget, and turned into prompt ids.

Why: the real gaps are tables far longer than the model's context (up to 1.1M tokens), so truncation is
the normal path. Re-tokenising the whole table at every truncation step, task by task, kept the GPU
waiting for minutes; here each table is read and tokenised once (ids and each token's start offset),
every cut is chosen from cumulative token counts per line, and the prompt's ids are composed from that
one tokenisation.

The cut: the users' rule first (the first and last 35% of the lines with ``\\n... [N rows omitted] ...\\n``
between, shrinking x0.8 up to 5 times), and where no step of it fits (a 32-line table of 83K-character
lines), a cut inside lines: the first and last halves of the room, in tokens.
With ``--max-input-tokens``, the users' truncate script's own cut instead (``cut_as_users``): their limit
on the text message, their marker layout, their last step kept even when it does not fit.

Exactness: Qwen's pre-tokenizer never joins a line break with the character after it, so the tokens of a
text split at the start of a non-empty line are the tokens of the two parts. Token runs between such
line starts are reused as they are; only the few characters around each join (the prompt around the
table, the marker, a line cut in two) are tokenised again. The ids equal the tokenizer's ids of the
final text (tests check it).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KEEP, SHRINK, STEPS = 0.35, 0.8, 5  # the users' rule: keep 0.35, then x0.8, up to 5 more times


@dataclass(frozen=True)
class TableText:
    """A table file's text as the users' scripts read it, and how many of its bytes that reading dropped."""

    text: str
    bytes_dropped: int


def read_table(path: str | Path) -> TableText:
    """The text ``open(path, 'r', encoding='utf-8', errors='ignore').read()`` gives, as the users' runs read every
    table: line ends made ``\\n`` (CRLF and lone CR) and bytes that are not UTF-8 dropped. Why: a rerun
    answers the same prompts as the run it completes (594 LaTeX tables have CRLF, 13 are not valid UTF-8 and
    were answered). The dropped bytes are counted so that the item says its table was not read whole."""
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8", errors="ignore")
    dropped = len(raw) - len(text.encode("utf-8"))
    return TableText(text.replace("\r\n", "\n").replace("\r", "\n"), dropped)


@dataclass
class TokenizedTable:
    """One table's text, its token ids and where each token starts; built once, shared by its tasks."""

    path: str
    text: str
    ids: np.ndarray  # int64 [T]
    token_starts: np.ndarray  # int64 [T], character offset of each token
    line_starts: np.ndarray  # int64 [lines], character offset of each line (0, then after every "\n")
    bytes_dropped: int = 0  # bytes of the file that are not UTF-8 (read_table)
    line_tokens: np.ndarray = field(init=False)  # int64 [lines + 1]: tokens before each line start (cumulative)
    safe: list[int] = field(init=False)  # line starts where the tokenisation splits cleanly (sorted)

    def __post_init__(self) -> None:
        self.line_tokens = np.append(np.searchsorted(self.token_starts, self.line_starts), len(self.ids))
        text, starts = self.text, self.token_starts
        at = np.searchsorted(starts, self.line_starts)
        self.safe = [int(p) for p, i in zip(self.line_starts[1:], at[1:])
                     if p < len(text) and text[p] not in "\r\n" and i < len(starts) and starts[i] == p]

    @classmethod
    def build(cls, path: str | Path, tokenizer) -> "TokenizedTable":
        read = read_table(path)
        text = read.text
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
        newlines = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == 10)
        return cls(str(path), text, ids, starts, np.concatenate([[0], newlines + 1]).astype(np.int64),
                   read.bytes_dropped)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def lines(self) -> int:
        return len(self.line_starts)

    def token_at(self, offset: int) -> int:
        """Index of the first token starting at or after character ``offset``."""
        return int(np.searchsorted(self.token_starts, offset))

    def cut(self, room: int, marker_tokens) -> "TableCut":
        """The table as it fits in ``room`` tokens: whole, by the users' rule, or cut inside lines.
        ``marker_tokens(text)`` counts a marker's tokens (it is tokenised with the prompt)."""
        if self.tokens <= room:
            return TableCut(self, [(0, len(self.text))], [], None, None, self.tokens)
        n, keep = self.lines, KEEP
        for _ in range(STEPS + 1):
            head = int(n * keep)
            omitted = n - 2 * head
            if head == 0 or omitted <= 0:
                break  # the rule keeps no line (or cuts nothing): only a cut inside lines can help
            marker = f"\n... [{omitted} rows omitted] ...\n"
            kept = int(self.line_tokens[head] + self.tokens - self.line_tokens[n - head])
            if kept + marker_tokens(marker) <= room:
                head_end = int(self.line_starts[head]) - 1  # without the line break the marker starts with
                return TableCut(self, [(0, head_end), (int(self.line_starts[n - head]), len(self.text))], [marker],
                                "lines", round(keep, 4), kept)
            keep *= SHRINK
        return self.cut_inside_lines(room, marker_tokens)

    def cut_as_users(self, limit: int, message_tokens) -> "TableCut":
        """The users' truncate script's cut, for ``--max-input-tokens``: the table whole when their text message
        has at most ``limit`` tokens (``message_tokens(cut)`` counts it), else their lines joined by ``\\n``
        around the line ``\\n... [N rows omitted] ...\\n`` (so the marker stands between blank lines): the first
        and last 35% of the lines, then x0.8 (at least one line each end) up to 5 times; the last try is kept
        even when it is still over the limit, as theirs was."""
        whole = TableCut(self, [(0, len(self.text))], [], None, None, self.tokens)
        if message_tokens(whole) <= limit:
            return whole
        keep = KEEP
        for step in range(STEPS + 1):
            kept = int(self.lines * keep)
            # their first try has no floor: lines[-0:] is every line, after the marker and nothing before it
            cut = self._users_lines(max(kept, 1) if step else kept, round(keep, 4))
            if message_tokens(cut) <= limit:
                break
            keep *= SHRINK
        return cut

    def _users_lines(self, kept: int, keep: float) -> "TableCut":
        """``'\\n'.join(lines[:kept] + [marker] + lines[-kept:])`` as character ranges of the text."""
        n = self.lines
        head_end = (int(self.line_starts[kept]) - 1 if kept < n else len(self.text)) if kept else 0
        tail_start = int(self.line_starts[n - kept]) if kept else 0
        marker = ("\n" if kept else "") + f"\n... [{n - 2 * kept} rows omitted] ...\n" + "\n"
        kept_tokens = int(self.line_tokens[kept] + self.tokens - self.line_tokens[n - kept]) if kept else self.tokens
        return TableCut(self, [(0, head_end), (tail_start, len(self.text))], [marker], "users", keep, kept_tokens)

    def cut_inside_lines(self, room: int, marker_tokens) -> "TableCut":
        """The first and last halves of ``room`` (less the marker) in tokens, cut at token starts."""
        guess = f"\n... [{len(self.text)} characters omitted] ...\n"
        left = max(room - marker_tokens(guess), 0)
        head, tail = left // 2, left - left // 2
        head_end = int(self.token_starts[head]) if head < self.tokens else len(self.text)
        tail_start = int(self.token_starts[self.tokens - tail]) if tail else len(self.text)
        tail_start = max(tail_start, head_end)
        marker = f"\n... [{tail_start - head_end} characters omitted] ...\n"
        return TableCut(self, [(0, head_end), (tail_start, len(self.text))], [marker], "tokens", None, head + tail)


@dataclass
class TableCut:
    """What of a table goes into the prompt: character ranges with a marker between each two."""

    table: TokenizedTable
    ranges: list[tuple[int, int]]
    markers: list[str]
    rule: str | None  # None (whole), "lines" (the users' steps), "tokens" (inside lines), "users" (theirs exactly)
    keep_share: float | None  # the users' rule: the share of lines kept at each end
    kept_tokens: int  # the table's tokens kept (from the one tokenisation)

    def text(self) -> str:
        parts = [self.table.text[self.ranges[0][0]:self.ranges[0][1]]]
        for marker, (a, b) in zip(self.markers, self.ranges[1:]):
            parts += [marker, self.table.text[a:b]]
        return "".join(parts)

    def segments(self) -> list[str | tuple[int, int]]:
        """The cut as text pieces (markers) and runs of the table's tokens to reuse, ``(first, end)``
        token indices, split at clean line starts; the text between runs is tokenised at the joins."""
        table, out = self.table, []
        for number, (a, b) in enumerate(self.ranges):
            if number:
                out.append(self.markers[number - 1])
            first = bisect.bisect_right(table.safe, a)  # the first clean line start inside (a, b)
            last = bisect.bisect_left(table.safe, b) - 1  # the last one before b
            if first > last:
                out.append(table.text[a:b])
                continue
            s1, s2 = table.safe[first], table.safe[last]
            out.append(table.text[a:s1])
            if s2 > s1:
                out.append((table.token_at(s1), table.token_at(s2)))
            out.append(table.text[s2:b])
        return out

    def record(self) -> dict:
        """What the item's provenance says of the cut."""
        return {"rule": self.rule, "keep_share": self.keep_share, "table_tokens": self.table.tokens,
                "table_tokens_kept": self.kept_tokens, "table_lines": self.table.lines}


class TableCache:
    """Each table read and tokenised once per shard, whichever thread asks first; the others wait for
    it. ``release`` drops a table once its last task has its prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tables: dict[str, TokenizedTable] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._users: dict[str, int] = {}
        self._guard = threading.Lock()
        self.builds = 0  # tables tokenised (one per distinct table unless released and asked again)

    def expect(self, path: str) -> None:
        """One more task will ask for ``path``."""
        with self._guard:
            self._users[path] = self._users.get(path, 0) + 1

    def get(self, path: str) -> TokenizedTable:
        with self._guard:
            lock = self._locks.setdefault(path, threading.Lock())
        with lock:
            if path not in self._tables:
                self._tables[path] = TokenizedTable.build(path, self.tokenizer)
                with self._guard:
                    self.builds += 1
            return self._tables[path]

    def release(self, path: str) -> None:
        with self._guard:
            self._users[path] = self._users.get(path, 1) - 1
            if self._users[path] <= 0:
                self._tables.pop(path, None)
