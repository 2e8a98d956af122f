"""Tokenizer files for a Llama export: the SentencePiece `tokenizer.model` kept as is,
plus `tokenizer.json` and `tokenizer_config.json` that transformers 4.x and 5.x load the same
way (`PreTrainedTokenizerFast`: tokenizer.json as written, no InternLM2 remote code), with
every added special token at its original id.

They tokenize as InternLM2's tokenizer did in training: the text is split at the added
tokens and each chunk is encoded by the SentencePiece model on its own, so with
`add_dummy_prefix` every chunk gets the `▁` prefix, also right after a special token (as
llama.cpp's `add_space_prefix` does). `LlamaTokenizer` is not used: transformers 5 rebuilds
its pipeline (Metaspace, prefix on the first chunk only) instead of reading tokenizer.json,
and transformers 4 rebuilds it from tokenizer.model (needs protobuf) when `add_prefix_space`
is set.

The model proto is read with a small wire-format reader (fields from
sentencepiece_model.proto), so omgtool needs no protobuf.

After writing, the tokenizer is loaded back through `AutoTokenizer` and its ids are
compared with SentencePiece's, chunk by chunk, on a fixed probe set (`check_tokenizer`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omgtool.errors import UnreadableInput
from omgtool.formats.jsonfile import read_json_object
from omgtool.formats.writer import write_json
from omgtool.formats.sentencepiece import CONTROL, UNKNOWN, USER_DEFINED, SpmModel, read_spm

# Source tokenizer files that are rewritten (or dropped: remote code) rather than carried.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.json")

# Fields of the source tokenizer_config.json that carry over unchanged.
KEEP_CONFIG = ("add_bos_token", "add_eos_token", "chat_template", "clean_up_tokenization_spaces",
               "model_max_length", "padding_side", "bos_token", "eos_token", "unk_token", "pad_token",
               "additional_special_tokens", "extra_special_tokens", "sp_model_kwargs")

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "hello world",
    " leading space and  two  spaces   three",
    "trailing space ",
    "new\nline\n\nand\ttab",
    "digits 0123456789 and 3.14159",
    "<|im_start|>user\nPlease segment the cat.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n  two spaces after a special token<|im_end|>\n",
    "unicode: café naïve 東京 😀",
    "",
)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added(entry: dict[str, Any], content: str, special: bool):
    from tokenizers import AddedToken

    return AddedToken(content, special=special, normalized=False, lstrip=bool(entry.get("lstrip", False)),
                      rstrip=bool(entry.get("rstrip", False)), single_word=bool(entry.get("single_word", False)))


def build_fast_tokenizer(spm: SpmModel, added: dict[int, dict[str, Any]], *, bos: str | None, eos: str | None,
                         add_bos: bool, add_eos: bool):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece BPE model: the same pieces at
    the same ids, merges ranked by piece id (as transformers' SentencePieceExtractor does),
    spaces to `▁` with the dummy prefix on each chunk between added tokens (only with
    add_dummy_prefix), byte fallback only when the model has it (otherwise unknown characters
    become one fused unk, as in SentencePiece)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    vocab = {piece: i for i, (piece, _, _) in enumerate(spm.pieces)}
    if len(vocab) != len(spm.pieces):
        raise UnreadableInput("tokenizer.model repeats a piece")
    unk = next((spm.pieces[i][0] for i in spm.ids_of(UNKNOWN)), None)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True,
                              byte_fallback=spm.byte_fallback, dropout=None))
    # A normalizer, not a Metaspace pre-tokenizer: it runs on each text chunk between added tokens
    # and prepends unconditionally, as SentencePiece does per chunk in InternLM2's tokenizer
    # (Metaspace "first" skips chunks after a special token; "always" skips chunks that
    # already start with a space).
    steps = [normalizers.Prepend("\u2581")] if spm.add_dummy_prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    tk.pre_tokenizer = None
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)

    # Pieces SentencePiece never splits (control, unknown, user-defined) are added tokens at their
    # ids; tokens past the SentencePiece vocab are appended in id order and must land on their ids.
    base = len(spm.pieces)
    for i in spm.ids_of(CONTROL, USER_DEFINED, UNKNOWN):
        entry = added.get(i, {})
        special = bool(entry.get("special", spm.pieces[i][2] != USER_DEFINED))
        tk.add_tokens([_added(entry, spm.pieces[i][0], special)])
    for i, entry in added.items():
        if i < base and entry.get("content") != spm.pieces[i][0]:
            raise UnreadableInput(f"tokenizer_config.json gives id {i} to {entry.get('content')!r} but "
                                  f"tokenizer.model has {spm.pieces[i][0]!r} there")
    extra = sorted(i for i in added if i >= base)
    if extra and extra != list(range(base, base + len(extra))):
        raise UnreadableInput(f"added token ids {extra} do not follow the SentencePiece vocab "
                              f"({base} pieces) without gaps")
    for i in extra:
        tk.add_tokens([_added(added[i], added[i]["content"], bool(added[i].get("special", True)))])
        got = tk.token_to_id(added[i]["content"])
        if got != i:
            raise UnreadableInput(f"added token {added[i]['content']!r} would get id {got}, not {i}")

    use_bos = add_bos and bos is not None and tk.token_to_id(bos) is not None
    use_eos = add_eos and eos is not None and tk.token_to_id(eos) is not None
    single = [f"{bos}:0"] * use_bos + ["$A:0"] + [f"{eos}:0"] * use_eos
    pair = single + [f"{bos}:1"] * use_bos + ["$B:1"] + [f"{eos}:1"] * use_eos
    specials = sorted({(t, tk.token_to_id(t)) for t, on in ((bos, use_bos), (eos, use_eos)) if on})
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tk


def write_llama_tokenizer(src: Path, dst: Path) -> dict[str, Any]:
    """Write tokenizer.model (copied), tokenizer.json and tokenizer_config.json into `dst`.

    Returns a report; a source folder with no tokenizer.model gets no tokenizer.
    """
    import shutil

    model_path = src / "tokenizer.model"
    if not model_path.is_file():
        return _carry_fast_tokenizer(src, dst)
    spm = read_spm(model_path)
    from omgtool.formats.tokenizer_files import added_tokens

    src_config = read_json_object(src / "tokenizer_config.json", missing_ok=True)
    added = added_tokens(src)
    bos = _token_text(src_config.get("bos_token", "<s>"))
    eos = _token_text(src_config.get("eos_token", "</s>"))
    add_bos = bool(src_config.get("add_bos_token", True))
    add_eos = bool(src_config.get("add_eos_token", False))
    try:
        tk = build_fast_tokenizer(spm, added, bos=bos, eos=eos, add_bos=add_bos, add_eos=add_eos)
    except UnreadableInput as exc:
        raise UnreadableInput(exc.message, src) from None
    tk.save(str(dst / "tokenizer.json"))
    shutil.copyfile(model_path, dst / "tokenizer.model")

    notes = list(spm.notes)
    all_added = {i: e for i, e in added.items()}
    for i in spm.ids_of(CONTROL, USER_DEFINED, UNKNOWN):
        all_added.setdefault(i, {"content": spm.pieces[i][0], "special": spm.pieces[i][2] != USER_DEFINED})
    cfg: dict[str, Any] = {k: src_config[k] for k in KEEP_CONFIG if k in src_config}
    cfg.update({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": {str(i): {"content": e["content"], "lstrip": bool(e.get("lstrip", False)),
                                          "normalized": False, "rstrip": bool(e.get("rstrip", False)),
                                          "single_word": bool(e.get("single_word", False)),
                                          "special": bool(e.get("special", True))}
                                 for i, e in sorted(all_added.items())},
    })
    cfg.setdefault("unk_token", next((spm.pieces[i][0] for i in spm.ids_of(UNKNOWN)), "<unk>"))
    write_json(dst / "tokenizer_config.json", cfg)
    if (src / "special_tokens_map.json").is_file():
        shutil.copyfile(src / "special_tokens_map.json", dst / "special_tokens_map.json")
    files = sorted(p.name for p in dst.iterdir() if p.name in TOKENIZER_FILES)
    return {"files": files, "tokenizer_class": cfg["tokenizer_class"], "sentencepiece_pieces": len(spm.pieces),
            "vocab_size": tk.get_vocab_size(with_added_tokens=True),
            "added_tokens": {e["content"]: i for i, e in sorted(all_added.items())},
            "add_prefix_space": spm.add_dummy_prefix, "byte_fallback": spm.byte_fallback, "notes": notes}


def _carry_fast_tokenizer(src: Path, dst: Path) -> dict[str, Any]:
    """No tokenizer.model: carry a tokenizer.json as it is, its config without remote code."""
    import shutil

    if not (src / "tokenizer.json").is_file():
        return {"files": [], "notes": ["source has no tokenizer.model or tokenizer.json: no tokenizer written"]}
    for name in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    cfg = read_json_object(src / "tokenizer_config.json", missing_ok=True)
    cfg.pop("auto_map", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(dst / "tokenizer_config.json", cfg)
    added = {e["content"]: int(i) for i, e in (cfg.get("added_tokens_decoder") or {}).items()
             if isinstance(e, dict) and "content" in e}
    return {"files": sorted(p.name for p in dst.iterdir() if p.name in TOKENIZER_FILES),
            "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens": added,
            "notes": ["source has no tokenizer.model: its tokenizer.json is carried as it is (not checked)"]}


def sentencepiece_chunk_ids(sp, text: str, added: dict[str, int]) -> list[int]:
    """InternLM2's tokenization in training: split at the added tokens (longest first), encode
    each non-empty chunk with SentencePiece on its own (its dummy prefix on every chunk)."""
    if not added:
        return sp.encode(text) if text else []
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for chunk in split.split(text):
        if chunk:
            ids += [added[chunk]] if chunk in added else sp.encode(chunk)
    return ids


def check_tokenizer(folder: Path, spm_path: Path, added: dict[str, int]) -> list[str]:
    """Load `folder` with AutoTokenizer (no remote code); compare ids with SentencePiece chunk
    by chunk on PROBES (plus one text holding every added token), and each added token with its
    id. Returns the differences (empty = same)."""
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    problems = []
    every = "".join(f"{t} x{i}\n" for i, t in enumerate(added))
    for text in PROBES + (every,):
        want = sentencepiece_chunk_ids(sp, text, added)
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            problems.append(f"{text!r}: exported tokenizer {got[:12]} vs SentencePiece per chunk {want[:12]}")
    for content, idx in added.items():
        got = tok.encode(content, add_special_tokens=False)
        if got != [idx]:
            problems.append(f"added token {content!r}: encodes to {got}, not [{idx}]")
    return problems
