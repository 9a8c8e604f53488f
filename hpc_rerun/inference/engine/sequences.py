"""The sequences of a batch: prompts as ids and rope positions, which of them take their beginning from
another (``Sharing``), and how long prompts are cut into prefill pieces and packed into forward passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHARE_MIN_TOKENS = 1024  # a common beginning shorter than this is prefilled again (not worth a second pass)


@dataclass
class Prompt:
    """One request, tokenized: ids, 3-D rope positions, its image's patches (CPU, pinned on GPU hosts)."""

    input_ids: torch.Tensor  # [L]
    positions: torch.Tensor  # [3, L]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None  # [1, 3]
    share_key: object = None  # prompts with equal keys may begin alike (checked token by token: Sharing)

    @property
    def length(self) -> int:
        return self.input_ids.shape[0]

    @property
    def next_position(self) -> int:
        return int(self.positions.max()) + 1


def shared_prefix(a: Prompt, b: Prompt, image_token_id: int) -> int:
    """How many first tokens ``b`` can take from ``a``: equal ids (and, over an image, the same picture),
    leaving ``b`` at least one token of its own (its first answer token comes from its last one)."""
    n = min(a.length, b.length) - 1
    if n <= 0:
        return 0
    differ = (a.input_ids[:n] != b.input_ids[:n]).nonzero()
    keys = int(differ[0]) if len(differ) else n
    same_image = (a.pixel_values is not None and b.pixel_values is not None
                  and torch.equal(a.image_grid_thw, b.image_grid_thw) and torch.equal(a.pixel_values, b.pixel_values))
    if not same_image:  # image pad tokens are equal ids whatever the picture: share only what comes before
        for prompt in (a, b):
            where = (prompt.input_ids[:keys] == image_token_id).nonzero()
            if len(where):
                keys = int(where[0])
    return keys


class Sharing:
    """Which prompts of a batch take their beginning from an earlier one: the first prompt of a share key is
    prefilled whole, a later one with the same key from where its ids differ (if the common part is long
    enough to be worth it). The batch planner and the generator ask the same way, so they agree."""

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id
        self.first: dict[object, int] = {}
        self.prompts: list[Prompt] = []

    def add(self, prompt: Prompt) -> tuple[int, int] | None:
        """(index of the prompt it shares with, keys shared) or None; ``prompt`` gets the next index."""
        index = len(self.prompts)
        self.prompts.append(prompt)
        if prompt.share_key is None:
            return None
        source = self.first.setdefault(prompt.share_key, index)
        if source == index:
            return None
        keys = shared_prefix(self.prompts[source], prompt, self.image_token_id)
        return (source, keys) if keys >= SHARE_MIN_TOKENS else None


def fill(items: list, size, budget: int, padded: bool = False, most: int | None = None) -> list[list]:
    """Consecutive groups in the given order, each within ``budget`` tokens: summed, or padded (every
    item as long as the newest, so give padded groups in increasing size), at most ``most`` items."""
    groups, current, total = [], [], 0
    for item in items:
        tokens = size(item)
        cost = (len(current) + 1) * tokens if padded else total + tokens
        if current and (cost > budget or (most is not None and len(current) >= most)):
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += tokens
    if current:
        groups.append(current)
    return groups


@dataclass
class Piece:
    """Tokens ``begin:end`` of prompt ``index``, prefilled in one pass (a long prompt takes several)."""

    index: int
    begin: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.begin


def prompt_pieces(index: int, begin: int, length: int, piece_tokens: int, image_span: tuple[int, int] | None
                  ) -> list[Piece]:
    """Cut tokens ``begin:length`` of a prompt into pieces of at most ``piece_tokens``, never inside its
    image's tokens (the vision tower's output goes in whole): a piece that would end inside the image ends
    after it."""
    pieces = []
    while begin < length:
        end = min(begin + piece_tokens, length)
        if image_span is not None and image_span[0] < end < image_span[1]:
            end = image_span[1]
        pieces.append(Piece(index, begin, end))
        begin = end
    return pieces


def prefill_passes(prompts: list[tuple[int, int, int, tuple[int, int] | None]], pass_tokens: int) -> list[list[Piece]]:
    """Prompts (index, first token to prefill, length, image span) in order, long ones in pieces, packed
    into forward passes of about ``pass_tokens``."""
    pieces = [piece for index, begin, length, span in prompts
              for piece in prompt_pieces(index, begin, length, pass_tokens, span)]
    return fill(pieces, lambda piece: piece.tokens, pass_tokens)
