"""The Llama export's tokenizer tokenizes as InternLM2's tokenizer did in training.

Oracle: tests/tokenizer_oracle.py, the `sentencepiece` package applied chunk by chunk between
the added tokens (what InternLM2Tokenizer does), never omgtool's code. The tokenizer folders
are shaped like internlm2-chat-7b's (dummy prefix on, chat tokens user-defined) plus
OMG-LLaVA's five tokens, with and without byte fallback.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.paths import BASE
from tests.tokenizer_oracle import OMG_TOKENS, chat_prompts, chunkwise_ids, write_internlm2_like_folder
from tests.cli_helpers import ok as _ok


@pytest.fixture(scope="module", params=[True, False], ids=["byte-fallback", "no-byte-fallback"])
def exported(request, tmp_path_factory):
    import sentencepiece

    from omgtool.ops.tokenizer_export import write_llama_tokenizer

    tmp = tmp_path_factory.mktemp("tok")
    added = write_internlm2_like_folder(tmp / "src", byte_fallback=request.param)
    (tmp / "dst").mkdir()
    report = write_llama_tokenizer(tmp / "src", tmp / "dst")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp / "src" / "tokenizer.model"))
    return {"src": tmp / "src", "dst": tmp / "dst", "added": added, "sp": sp, "report": report}


def test_chat_prompts_match_chunkwise_sentencepiece(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported["dst"]))
    sp, added = exported["sp"], exported["added"]
    prompts = chat_prompts(added)
    assert all(any(t in p for p in prompts) for t in added)  # every added token and chat token is probed
    for text in prompts:
        want = chunkwise_ids(sp, text, added)
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert tok(text).input_ids == [1] + want, text  # add_bos_token kept
    # the chunk after a special token starts with the dummy prefix, as in training and llama.cpp
    ids = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    assert ids[0] == added["<|im_start|>"]
    assert tok.convert_ids_to_tokens(ids[1]).startswith("\u2581")


def test_the_oracle_tells_the_old_pipeline_apart(exported):
    """Whole-text SentencePiece (what a Metaspace 'first' pre-tokenizer reproduces) differs
    from the chunk-wise ids on the chat prompts, so the parity test above can fail."""
    sp, added = exported["sp"], exported["added"]
    differ = [t for t in chat_prompts(added) if sp.encode(t) != chunkwise_ids(sp, t, added)]
    assert len(differ) >= 5


def test_tokenizer_json_alone_and_config_read_the_same(exported):
    """tokenizer.json read by the `tokenizers` library alone (what other clients load) gives
    the same ids; tokenizer_config.json names no class that rebuilds the pipeline."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(exported["dst"] / "tokenizer.json"))
    sp, added = exported["sp"], exported["added"]
    for text in chat_prompts(added):
        assert tk.encode(text, add_special_tokens=False).ids == chunkwise_ids(sp, text, added), text
    cfg = json.loads((exported["dst"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "add_prefix_space" not in cfg and "legacy" not in cfg and "auto_map" not in cfg
    assert (exported["dst"] / "tokenizer.model").read_bytes() == (exported["src"] / "tokenizer.model").read_bytes()
    for content in OMG_TOKENS:
        assert cfg["added_tokens_decoder"][str(added[content])]["content"] == content


def test_export_checks_its_tokenizer_chunkwise(exported):
    from omgtool.ops.tokenizer_export import check_tokenizer

    assert check_tokenizer(exported["dst"], exported["src"] / "tokenizer.model", exported["added"]) == []


def test_llama_export_with_an_internlm2_like_tokenizer(tmp_path):
    """End to end: `export --to llama` of the tiny base with this tokenizer reports identical
    ids, and the written tokenizer agrees with the oracle on a chat prompt."""
    import sentencepiece
    from transformers import AutoTokenizer

    src = tmp_path / "base"
    shutil.copytree(BASE, src)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    added = write_internlm2_like_folder(src, byte_fallback=True)
    result = _ok("export", src, "--to", "llama", "--out", tmp_path / "llama", "--json")
    report = json.loads(result.stdout)
    assert report["tokenizer"]["check"].startswith("identical"), report["tokenizer"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    text = chat_prompts(added)[1]
    assert tok.encode(text, add_special_tokens=False) == chunkwise_ids(sp, text, added)
