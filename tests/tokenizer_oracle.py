"""An independent oracle for InternLM2's tokenization in training, and tokenizer folders
shaped like internlm2-chat-7b's for the tests.

InternLM2Tokenizer (transformers' slow-tokenizer `tokenize`) splits the text at every added
token (longest match first, at the leftmost position), drops empty chunks, and encodes each
remaining chunk with `SentencePieceProcessor.encode` on its own, so every chunk gets the
model's dummy prefix. Only the `sentencepiece` package is used here: no omgtool code.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

# OMG-LLaVA's tokens, in the order training added them (shared/reference/omg-llava.md).
OMG_TOKENS = ("[SEG]", "<p>", "</p>", "<region>", "<mark>")


def chunkwise_ids(sp, text: str, added: dict[str, int], *, space: bool = False) -> list[int]:
    """Ids as InternLM2's tokenizer gives them (no BOS). `space` puts a ' ' before every chunk
    first (llama.cpp's add_space_prefix, for a model without its own dummy prefix)."""
    if not added:
        return sp.encode(text) if text else []
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for chunk in pattern.split(text):
        if not chunk:
            continue
        ids += [added[chunk]] if chunk in added else sp.encode(" " * space + chunk)
    return ids


def train_internlm2_like_model(*, byte_fallback: bool, dummy_prefix: bool = True, vocab_size: int = 600) -> bytes:
    """A small BPE SentencePiece model trained like internlm2-chat-7b's: identity normalizer,
    spaces kept, the dummy prefix on, the six chat tokens as user-defined pieces."""
    import sentencepiece

    from fixtures.generate import CHAT_TOKENS, tokenizer_corpus

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        byte_fallback=byte_fallback, split_digits=True, user_defined_symbols=list(CHAT_TOKENS), minloglevel=2)
    return buf.getvalue()


def write_internlm2_like_folder(dst: Path, *, byte_fallback: bool, dummy_prefix: bool = True,
                                vocab_size: int = 600) -> dict[str, int]:
    """tokenizer.model + tokenizer_config.json (InternLM2 remote-code classes) with OMG-LLaVA's
    tokens registered past the SentencePiece vocab, as merge-lora writes them. Returns every
    added token -> id (the chat tokens included)."""
    import sentencepiece

    from fixtures.generate import CHAT_TOKENS

    dst.mkdir(parents=True, exist_ok=True)
    model = train_internlm2_like_model(byte_fallback=byte_fallback, dummy_prefix=dummy_prefix, vocab_size=vocab_size)
    (dst / "tokenizer.model").write_bytes(model)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    added = {"<unk>": 0, "<s>": 1, "</s>": 2}
    added.update({t: sp.piece_to_id(t) for t in CHAT_TOKENS})
    added.update({t: sp.get_piece_size() + i for i, t in enumerate(OMG_TOKENS)})

    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "</s>", "tokenizer_class": "InternLM2Tokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                          "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
           "additional_special_tokens": list(CHAT_TOKENS) + list(OMG_TOKENS),
           "chat_template": "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
                            "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
           "added_tokens_decoder": {str(i): entry(t) for t, i in sorted(added.items(), key=lambda kv: kv[1])}}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return added


def chat_prompts(added: dict[str, int]) -> list[str]:
    """Chat prompts that hold every added token, in the places training puts them and in
    awkward ones (adjacent tokens, spaces and newlines on either side, text glued to them)."""
    every = " ".join(added)
    return [
        "<|im_start|>user\n",
        "<|im_start|>user\n<image>\nPlease segment the red car near the tree.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>assistant\nIt is <p>the red car</p> [SEG].<|im_end|>\n",
        "<|im_start|>user\nWhat is in <region>? And at <mark> here<mark>.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n  two spaces<|im_end|>",
        "<p></p>[SEG][SEG] <region>\n<mark>\t<|action_start|><|plugin|>call()<|action_end|>\n",
        "<|im_start|>user\n<|interpreter|> print(3.14159)<|im_end|>\n<s>text</s> <unk>",
        "caf\u00e9 \u6771\u4eac \U0001F600 <p>caf\u00e9</p>",
        every,
        every.replace(" ", ""),
        " leading space<|im_end|> after",
    ]
