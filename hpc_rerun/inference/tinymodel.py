"""Build a tiny, random, deterministic Qwen3-VL that loads exactly like the real one.

Nothing here reaches a model hub: the tokenizer is a byte-level BPE trained on a fixed text, the
weights are drawn from a fixed seed, and everything is written with ``save_pretrained`` so tests,
the demo and the worker load it through ``Qwen3VLForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained``, the same code path as Qwen3-VL-8B-Instruct.
"""

from __future__ import annotations

from pathlib import Path

# Qwen's special tokens in their real order (Qwen2.5/3-VL tokenizer_config.json).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style chat template: one turn per message, image placeholders where the content list has them.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The fixed training text for the BPE: prompt words, table markup in every format, digits.
_CORPUS_LINES = [
    "You are a helpful assistant that answers questions about tables.",
    "Answer the question based on the table. The final answer format is [Final Answer]: AnswerName1, AnswerName2",
    "Fact Checking Numerical Reasoning Data Analysis Structure Comprehending Visualization",
    "Summary Exploratory Rudimentary Predictive Anomaly CorrelationRelation CorrelationCoefficient",
    "import pandas as pd \n import matplotlib.pyplot as plt \n df = pd.read_excel('table.xlsx') \n plt.show()",
    "<table><tr><td class=\"style1\">Year</td><td>Total</td></tr></table> <html><head><style>",
    "\\begin{tabular}{|c|c|} \\hline Year & Total \\\\ \\end{tabular}",
    "| Year | Employment | Agriculture | Total |\n|---|---|---|---|\n| 1955 | 62170 | 6450 | 68620 |",
    '{"columns": ["Year", "Total"], "data": [[1955, 62170], [1954, 60890]]}',
    "Year,Employment,Agriculture,Total\n1953,61179,6260,63015\n1954,60109,6205,64468",
    "economy science employment labor society health table swap sector England Wales Scotland",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 1000 0.5 1.25 -3 % $ ( ) [ ] { } : ; , .",
    "The quick brown fox jumps over the lazy dog. the a an and of in to is was for on with by",
]


def _train_tokenizer(vocab_size: int):
    """Train a byte-level BPE with Qwen2's normaliser and split pattern and wrap it as Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS_LINES * 4, trainer=trainer)
    state = bpe.model.__getstate__()
    import json

    model_json = json.loads(state)
    vocab = model_json["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        model_max_length=262144,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen3vl(out_dir: str | Path, seed: int = 0, vocab_size: int = 512, answer: str | None = None) -> Path:
    """Write a tiny random Qwen3-VL (model, tokenizer, processor, chat template) to ``out_dir``.

    Deterministic for a given seed and library version; well under 2 MB on disk. With ``answer``,
    the weights are set so that it always replies exactly that text (see ``make_it_answer``).
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if answer is not None:
        make_it_answer(model, tokenizer, answer)
    # Qwen3-VL-8B-Instruct's generation_config.json (sampling on, repetition_penalty 1.0: no penalty,
    # but present), with the tiny tokenizer's ids.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.0,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
    )
    model.save_pretrained(out)

    # The real preprocessor_config.json: 16 px patches, 2x2 merge, up to 16.8M px.
    pixel_limits = {"longest_edge": 16777216, "shortest_edge": 65536}
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, size=pixel_limits,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def make_it_answer(model, tokenizer, answer: str) -> None:
    """Set the weights so that the model always replies ``answer`` (then <|im_end|>), whatever it is asked.

    Every attention and MLP block writes zero into the residual stream, so the last position's logits
    depend on the last token alone; each token of the reply gets its own basis vector as embedding
    and the lm_head row of the token after it points along that vector: a fixed chain from the end
    of the chat template's generation prompt to <|im_end|>. For the demo, where a random model would
    never produce a well-formed answer. It still runs the real architecture and loading code.
    """
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
    start = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    chain = [start] + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"{answer!r}: each token of the answer must differ from the others (and from the "
                         "prompt's last token) for a fixed chain")
    text = model.model.language_model
    hidden = text.config.hidden_size
    if len(chain) > hidden:
        raise ValueError(f"{answer!r} is too long for a {hidden}-wide model")
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = text.embed_tokens.weight, model.lm_head.weight
        for position, (token, following) in enumerate(zip(chain, chain[1:])):
            basis = torch.zeros(hidden)
            basis[position] = 1.0
            embed[token] = basis
            head[following] = 10.0 * basis
