"""The engine, one file per concern (after the small, readable engines):

- core.py: ``Engine``: the model loaded once; prompts made as the users' processor makes them; generate
- batches.py: ``BatchStream``: batches as their prompts become ready, re-asks joining later ones
- memory.py: what a batch and one prompt may take of the card
- sampling.py: the generation settings the packed loop implements, and each step's token choice
- sequences.py: prompts, shared beginnings, prefill pieces and passes
- attention.py: attention over the K/V pool: layouts, key pieces, the kinds of attention
- kernels.py: which attention this card runs, chosen once at load
- generator.py: ``PackedGenerator``: packed prefill and decode, decode steps as CUDA graphs
- padded.py: HF generate on padded batches, for settings the packed loop does not implement
"""

from .batches import BatchStream
from .core import TABLE_SLOT, Encoded, Engine, PromptTooLong, Request
from .memory import GPU_MEMORY_ENV

__all__ = ["GPU_MEMORY_ENV", "TABLE_SLOT", "BatchStream", "Encoded", "Engine", "PromptTooLong", "Request"]
