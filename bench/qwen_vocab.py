"""A processor folder with the real Qwen vocabulary, for benchmarks that need real token counts.

    python bench/qwen_vocab.py OUT_DIR [--tiktoken PATH]

Qwen's 151,643 BPE ranks ship in the PyPI package ``dashscope`` (``dashscope/resources/qwen.tiktoken``;
``--tiktoken`` points at the file, or at the wheel itself). They are converted with transformers'
tiktoken converter (Qwen2's split pattern and byte-level alphabet), the special tokens get their real ids
(``<|endoftext|>`` 151643, ``<|im_end|>`` 151645, ``<|image_pad|>`` 151655, ...), and the tiny model's
image/video processor and chat template complete the folder: ``from_pretrained`` loads it like the real
processor. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def find_tiktoken(given: str | None) -> Path:
    if given and not given.endswith(".whl"):
        return Path(given)
    if given:
        with zipfile.ZipFile(given) as wheel:
            out = Path(tempfile.mkdtemp()) / "qwen.tiktoken"
            out.write_bytes(wheel.read("dashscope/resources/qwen.tiktoken"))
            return out
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        raise SystemExit("dashscope is not installed: pip install dashscope, or pass --tiktoken PATH")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def build(out_dir: Path, tiktoken_path: Path) -> Path:
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import AutoProcessor, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from hpc_rerun.inference.tinymodel import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_qwen3vl

    backend = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=QWEN_SPLIT).converted()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ranks = backend.get_vocab_size()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=262144)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})  # in Qwen's order: their real ids
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ranks == 151643 and ids == list(range(151643, 151643 + len(SPECIAL_TOKENS))), (ranks, ids)
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny = build_tiny_qwen3vl(Path(tempfile.mkdtemp()) / "tiny")
    processor = AutoProcessor.from_pretrained(tiny)
    processor.tokenizer = tokenizer
    processor.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tiktoken", help="qwen.tiktoken, or the dashscope wheel that holds it")
    args = parser.parse_args()
    out = build(args.out_dir, find_tiktoken(args.tiktoken))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    sample = "<table><tr><td>Employment 1995</td><td>12,345.6</td></tr></table>"
    print(f"{out}: {len(processor.tokenizer)} tokens; {len(sample)} characters of HTML -> "
          f"{len(processor.tokenizer(sample)['input_ids'])} tokens")


if __name__ == "__main__":
    main()
