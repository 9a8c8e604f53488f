"""Generation settings: one declaration of the users' decoding, written into plan.json and every shard spec.

The defaults are the users' own sampling (Qwen3-VL-8B-Instruct's generation_config: T 0.7, top-p 0.8,
top-k 20); ``greedy`` is the plan's --greedy. In JSON only the settings that are set appear, so a greedy
spec reads ``{"do_sample": false, "max_new_tokens": N}`` as it always has; other HF ``generate`` keys a
spec carries (``min_new_tokens``, ``repetition_penalty``, ...) are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DEFAULT_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class Generation:
    do_sample: bool | None = True  # None: the model's generation_config decides
    temperature: float | None = 0.7
    top_p: float | None = 0.8
    top_k: int | None = 20
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    extra: dict = field(default_factory=dict)  # any other ``generate`` keyword a spec holds

    @classmethod
    def greedy(cls, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> "Generation":
        return cls(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens)

    @classmethod
    def sampled(cls, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> "Generation":
        return cls(max_new_tokens=max_new_tokens)

    @classmethod
    def from_json(cls, data: "dict | Generation | None") -> "Generation":
        """A spec's or plan's ``generation`` object; keys not given are not set (greedy stays greedy)."""
        if isinstance(data, Generation):
            return data
        data = dict(data or {})
        declared = {f.name for f in fields(cls)} - {"extra"}
        known = {name: data.pop(name, None) for name in declared}
        return cls(do_sample=known["do_sample"], temperature=known["temperature"], top_p=known["top_p"],
                   top_k=known["top_k"], max_new_tokens=int(known["max_new_tokens"] or DEFAULT_MAX_NEW_TOKENS),
                   extra=data)

    def to_json(self) -> dict:
        """The keyword arguments of HF ``generate`` (what specs store): the settings that are set."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in values.items() if v is not None}, **self.extra}

    def hf_kwargs(self) -> dict:
        """A fresh dict for ``model.generate(**kwargs)`` and the engine's sampling."""
        return self.to_json()

    def get(self, key: str, default=None):
        """One setting by its HF name (``min_new_tokens`` included)."""
        return self.to_json().get(key, default)
