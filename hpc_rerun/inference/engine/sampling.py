"""The generation settings the packed loop implements, merged with the model's own as HF generate merges
them, and the token choice of one step (HF's logits processors and warpers, in its order)."""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from .sequences import Prompt

log = logging.getLogger(__name__)

# Generation settings the packed loop implements, as HF generate applies them.
IMPLEMENTED = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
               "min_new_tokens"}
# Settings that never change which tokens come out: ids the loop reads, HF's own cache, what generate returns.
NO_EFFECT = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
             "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
             "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
             "low_memory", "max_length", "prefill_chunk_size"}
BEAM_ONLY = {"length_penalty", "early_stopping"}  # shape beam scores; nothing with one beam


@dataclass
class Sampling:
    """The generation settings the packed loop understands (merged with the model's own defaults)."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: list[int]
    pad_token_id: int
    min_p: float | None = None
    repetition_penalty: float = 1.0
    _eos: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, model_defaults, generation: dict) -> Sampling | None:
        """Merge like HF generate does (the model's generation_config, then the call's settings); None
        when the result needs something only HF generate does (beams, n-gram bans, ...).

        A setting at its no-op value (``repetition_penalty`` 1.0, as Qwen3-VL ships it; one beam) is no
        reason to leave the packed loop: only settings that change the tokens count."""
        merged = copy.deepcopy(model_defaults) if model_defaults is not None else GenerationConfig()
        unknown = merged.update(**generation)
        defaults = GenerationConfig._get_default_generation_params()  # what generate() fills in when unset

        def setting(name):
            value = getattr(merged, name, None)
            return defaults.get(name) if value is None else value

        def changes_tokens(name) -> bool:
            if name in IMPLEMENTED or name in NO_EFFECT or (name in BEAM_ONLY and setting("num_beams") == 1):
                return False
            value = getattr(merged, name, None)
            return value is not None and value != defaults.get(name)

        needs_generate = sorted(set(unknown or ()) | {k for k in merged.to_diff_dict() if changes_tokens(k)})
        if needs_generate or merged.max_new_tokens is None:
            _say_fallback(tuple(needs_generate) or ("max_new_tokens unset",))
            return None
        eos = merged.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = merged.pad_token_id if merged.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(max_new_tokens=int(merged.max_new_tokens), min_new_tokens=int(merged.min_new_tokens or 0),
                   do_sample=bool(setting("do_sample")), temperature=float(setting("temperature")),
                   top_k=int(setting("top_k") or 0), top_p=float(setting("top_p")),
                   eos_token_ids=eos, pad_token_id=pad, min_p=merged.min_p,
                   repetition_penalty=float(setting("repetition_penalty")))

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0

    def seen_tokens(self, prompts: list[Prompt], vocab_size: int, device) -> torch.Tensor | None:
        """[n, vocab] True where a sequence's ids (prompt, then generated) hold the token: what
        ``repetition_penalty`` applies to, as HF does over the whole input_ids. None without a penalty."""
        if not self.penalised:
            return None
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        rows = torch.cat([torch.full((p.length,), i, dtype=torch.long) for i, p in enumerate(prompts)])
        ids = torch.cat([p.input_ids for p in prompts])
        seen[rows.to(device), ids.to(device)] = True
        return seen

    def pick(self, logits: torch.Tensor, produced: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Next token per row, as HF's greedy/sampling would choose it: its logits processors in its
        order (repetition penalty, min_new_tokens), then its warpers (temperature, top-k, top-p, min-p).

        ``produced`` (tokens generated so far) and ``seen`` are device tensors, so a CUDA graph can
        replay this."""
        logits = logits.float()
        if seen is not None:
            logits = torch.where(seen, torch.where(logits < 0, logits * self.repetition_penalty,
                                                   logits / self.repetition_penalty), logits)
        if self.min_new_tokens and self.eos_token_ids:
            if self._eos is None:  # made once, at prefill: a CUDA graph cannot copy from the host
                self._eos = torch.tensor(self.eos_token_ids, device=logits.device)
            eos = self._eos
            logits[:, eos] = torch.where(produced < self.min_new_tokens, float("-inf"), logits[:, eos])
        if not self.do_sample:
            return logits.argmax(-1)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[:, -1] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        if self.min_p is not None:
            probs = logits.softmax(-1)
            drop = probs < self.min_p * probs.amax(-1, keepdim=True)
            drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
            logits = logits.masked_fill(drop, float("-inf"))
        # torch.multinomial's own way for one sample (the same draws for the same seed), without its
        # host-side validity check: that check syncs every step and cannot be captured in a CUDA graph.
        probs = logits.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


@functools.cache
def _say_fallback(settings: tuple[str, ...]) -> None:
    log.warning("generation settings %s need HF generate: batches are padded (slower)", ", ".join(settings))


