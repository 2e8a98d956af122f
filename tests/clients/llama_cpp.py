"""`make clients`: the Llama export of the tiny fixture through llama.cpp's own converter.

    python -m tests.clients.llama_cpp [--work build/clients] [--llama-tokenize]

1. llama.cpp is taken from the `llama-cpp-python` sdist on the package registry (pip
   download, pinned), unpacked under --work; nothing of it enters the repository.
2. The tiny finetune is merged into the tiny base (merge-lora) and exported `--to llama`;
   a second export swaps in an InternLM2-like tokenizer (SentencePiece dummy prefix on, as
   internlm2-chat-7b's) with the same 320 pieces and OMG-LLaVA's tokens.
3. `convert_hf_to_gguf.py --outtype f32` converts both, under transformers 4.57.6 (the
   converter's own requirement) from a side install.
4. The GGUF files are read back with the `gguf` package from the registry (not the sdist's
   gguf-py): metadata, the token list (<mark> is outside vocab_size and dropped), every tensor
   against the export's safetensors (q/k rows in llama.cpp's interleaved-rope order).
5. With --llama-tokenize, llama.cpp's `llama-tokenize` is built from the sdist (cmake, CPU
   only; minutes on 2 cores, kept under --work) and tokenizes chat prompts: with the dummy
   prefix its ids must equal training's (SentencePiece per chunk), <mark> aside.

Prints one line per check and exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.clients.side import TRANSFORMERS4, TRANSFORMERS4_PACKAGES, side_install
from tests.paths import BASE, FINETUNE, ROOT
from tests.tokenizer_oracle import OMG_TOKENS, chat_prompts, chunkwise_ids, write_internlm2_like_folder

SDIST = "llama-cpp-python==0.3.36"
GGUF_PACKAGES = ["gguf==0.19.0", "protobuf>=4.21,<5"]  # protobuf: the converter reads tokenizer.model's proto


class CheckFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        raise CheckFailed(what)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(map(str, cmd[:3]))} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def fetch_llama_cpp(work: Path) -> Path:
    """vendor/llama.cpp of the pinned sdist, unpacked once under work/."""
    root = work / "llama.cpp"
    if (root / ".unpacked").is_file():
        return root
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob("llama_cpp_python-*.tar.gz")):
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dl)])
    sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        prefix = next(m.name for m in tar.getmembers()
                      if m.name.endswith("/vendor/llama.cpp/convert_hf_to_gguf.py")).rsplit("/", 1)[0]
        members = [m for m in tar.getmembers() if m.name.startswith(prefix + "/")]
        for m in members:
            m.name = m.name[len(prefix) + 1:]
        tar.extractall(root, members=members, filter="data")
    (root / ".unpacked").write_text(sdist.name)
    return root


def build_exports(work: Path) -> dict[str, Path]:
    """merge-lora + export --to llama of the tiny fixture; the same with an InternLM2-like tokenizer."""
    from omgtool.ops.export import export_llama
    from omgtool.ops.merge import plan_merge, run_merge

    runs = work / "run"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    run_merge(plan_merge(FINETUNE, BASE), runs / "merged")
    export_llama(runs / "merged", runs / "omg-tiny-llama")
    prefixed = runs / "merged-dummy-prefix"
    shutil.copytree(runs / "merged", prefixed)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (prefixed / name).unlink(missing_ok=True)
    added = write_internlm2_like_folder(prefixed, byte_fallback=True)
    _resize_tables(prefixed, rows=added["<mark>"])  # every OMG-LLaVA token embedded but <mark>, as in training
    export_llama(prefixed, runs / "omg-tiny-llama-dummy-prefix")
    return {"tiny": runs / "omg-tiny-llama", "dummy-prefix": runs / "omg-tiny-llama-dummy-prefix"}


def _resize_tables(folder: Path, rows: int) -> None:
    """Give the merged InternLM2 folder's tok_embeddings/output `rows` rows (new rows random),
    so its vocabulary fits the larger InternLM2-like tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    for f in folder.glob("model*.safetensors"):
        tensors = load_file(str(f))
        for name in ("model.tok_embeddings.weight", "output.weight"):
            if name in tensors:
                t = tensors[name]
                extra = torch.randn(rows - t.shape[0], t.shape[1], generator=gen).to(t.dtype) * t.float().std()
                tensors[name] = torch.cat([t, extra.to(t.dtype)]).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}, indent=2))


def convert(llama_cpp: Path, folder: Path) -> Path:
    out = folder.with_suffix(".gguf")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRANSFORMERS4), str(GGUF_SIDE)])}
    proc = run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                "--outtype", "f32"], env=env)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    print(f"      convert_hf_to_gguf.py {folder.name} -> {out.name}; its warnings: {warnings}")
    return out


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_gguf(path: Path, folder: Path) -> dict:
    import gguf
    import numpy as np
    import sentencepiece
    import torch
    from safetensors.torch import load_file

    check(Path(gguf.__file__).is_relative_to(GGUF_SIDE), f"GGUF read with the registry's {GGUF_PACKAGES[0]} "
          f"({Path(gguf.__file__).parent}), not the sdist's gguf-py")
    reader = gguf.GGUFReader(str(path))
    cfg = json.loads((folder / "config.json").read_text())
    meta = {k: _field(reader, k) for k in (
        "general.architecture", "general.name", "llama.block_count", "llama.context_length",
        "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
        "llama.vocab_size", "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")}
    print(f"      {path.name}: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    check(meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "llama",
          "architecture llama, SentencePiece (llama) vocabulary")
    check(bool(meta["general.name"]) and meta["general.name"] != "n/a", f"general.name {meta['general.name']!r} "
          f"(from _name_or_path {cfg['_name_or_path']!r})")
    check(meta["llama.rope.freq_base"] == 1e6, "rope freq_base 1e6 (InternLM2's rope_theta), not 10000")
    rows = cfg["vocab_size"]
    want = {"llama.block_count": 2, "llama.context_length": 32768, "llama.embedding_length": 512,
            "llama.feed_forward_length": 384, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.vocab_size": rows, "llama.rope.dimension_count": 128, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}
    check(all(meta[k] == v for k, v in want.items()), f"layers, context, widths, heads, vocab_size {rows} (the "
          "embedding rows), head_dim 128, bos/eos ids, add_bos_token")
    check(abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9, "rms_norm_eps 1e-5")

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    n = len(pieces)
    check(len(tokens) == rows == n + 4 and tokens[:n] == pieces and tokens[n:] == list(OMG_TOKENS[:4]),
          f"token list: the {n} SentencePiece pieces at their ids, then [SEG] <p> </p> <region> at {n}-{n + 3}")
    check("<mark>" not in tokens, f"<mark> (id {rows}, past the {rows} embedding rows) is not in the GGUF vocabulary")
    special = {t for t, ty in zip(tokens, types) if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)}
    check(set(OMG_TOKENS[:4]) | {"<|im_start|>", "<|im_end|>"} <= special,
          "OMG-LLaVA and chat tokens typed control/user-defined (llama.cpp splits the text at them)")

    hf = {}
    for f in sorted(folder.glob("model*.safetensors")):
        hf.update(load_file(str(f)))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def interleaved(w, n):  # HF rotate-half rows -> llama.cpp's interleaved rope pairs, per head
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
    for i in range(cfg["num_hidden_layers"]):
        for g, h in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm")):
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    got = {t.name: t for t in reader.tensors}
    check(set(got) == set(names) and set(names.values()) == set(hf), f"{len(got)} tensors, one per exported weight")
    worst = 0.0
    for gname, hname in names.items():
        t = got[gname]
        value = torch.from_numpy(np.array(t.data)).reshape(tuple(int(s) for s in reversed(t.shape)))
        want_t = hf[hname].float()
        if gname.endswith("attn_q.weight"):
            want_t = interleaved(want_t, heads)
        elif gname.endswith("attn_k.weight"):
            want_t = interleaved(want_t, kv)
        if value.shape != want_t.shape:
            check(False, f"{gname} shape {list(value.shape)} vs {hname} {list(want_t.shape)}")
        worst = max(worst, float((value - want_t).abs().max()))
    check(worst == 0.0 and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in got.values()),
          "every tensor F32 and equal to the export's (q/k in interleaved-rope order), max |diff| 0")
    return {"meta": meta, "tokens": tokens, "special": special, "byte_fallback": "<0x00>" in tokens}


def build_llama_tokenize(llama_cpp: Path) -> Path:
    binary = llama_cpp / "build" / "bin" / "llama-tokenize"
    if binary.is_file():
        return binary
    if not (shutil.which("cmake") and shutil.which("c++")):
        raise CheckFailed("--llama-tokenize needs cmake and a C++ compiler")
    run(["cmake", "-S", str(llama_cpp), "-B", str(llama_cpp / "build"), "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=OFF"])
    run(["cmake", "--build", str(llama_cpp / "build"), "--target", "llama-tokenize", "-j", str(os.cpu_count() or 2)])
    return binary


def llama_cpp_ids(binary: Path, gguf_path: Path, text: str) -> list[int]:
    proc = run([str(binary), "-m", str(gguf_path), "-p", text, "--ids", "--log-disable"])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_tokenization(binary: Path, gguf_path: Path, folder: Path, info: dict) -> None:
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    added = {t: i for t, i in tok.get_vocab().items() if t in set(tok.added_tokens_encoder)}
    in_gguf = {t: i for t, i in added.items() if t in info["special"]}
    dummy = sp.encode("a", out_type=str)[0].startswith("\u2581")  # the model's own add_dummy_prefix
    space = info["meta"]["tokenizer.ggml.add_space_prefix"]
    space = True if space is None else bool(space)  # llama.cpp's default for SentencePiece vocabularies
    if dummy and not space:
        raise CheckFailed("add_space_prefix off with a dummy-prefix model: not modelled here")
    same, differ, skipped = 0, [], 0
    for text in chat_prompts(added):
        training = [1] + chunkwise_ids(sp, text, added)
        check(tok(text).input_ids == training, f"transformers = training on {text[:40]!r}")
        if sp.unk_id() in training[1:] and not info["byte_fallback"]:
            skipped += 1  # llama.cpp aborts (std::out_of_range) on a character an SPM vocab without bytes lacks
            continue
        got = llama_cpp_ids(binary, gguf_path, text)
        # llama.cpp: split at its special tokens (<mark> is not one), ' ' before every chunk when
        # add_space_prefix, then SentencePiece (whose own dummy prefix is that space)
        rule = [1] + chunkwise_ids(sp, text, in_gguf, space=space and not dummy)
        check(got == rule, f"llama.cpp ids follow its rule on {text[:40]!r}")
        if got == training:
            same += 1
        else:
            differ.append(text)
    print(f"      {gguf_path.name}: llama.cpp = training on {same} of {same + len(differ)} chat prompts"
          + (f" ({skipped} with characters the vocabulary lacks skipped: llama.cpp aborts on them when the "
             "model has no byte fallback)" if skipped else ""))
    if dummy:
        check(all("<mark>" in t for t in differ), "with the dummy prefix (InternLM2's case) llama.cpp tokenizes "
              "exactly as training, except where <mark> (not in its vocabulary) is spelled out as text")
    else:
        print("      no dummy prefix in this tokenizer.model: llama.cpp still prefixes every chunk (its Llama "
              "converter writes no add_space_prefix, and llama.cpp's default is on)")


def main(argv: list[str] | None = None) -> int:
    global GGUF_SIDE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "clients")
    parser.add_argument("--llama-tokenize", action="store_true", help="build llama.cpp's llama-tokenize and "
                        "compare its ids with training's (minutes on 2 cores the first time)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    GGUF_SIDE = work / "side-gguf"
    try:
        llama_cpp = fetch_llama_cpp(work)
        check((llama_cpp / "convert_hf_to_gguf.py").is_file(), f"llama.cpp from the {SDIST} sdist "
              f"({(llama_cpp / '.unpacked').read_text()}) under {llama_cpp}")
        side_install(TRANSFORMERS4, TRANSFORMERS4_PACKAGES)
        side_install(GGUF_SIDE, GGUF_PACKAGES)
        sys.path.insert(0, str(GGUF_SIDE))
        exports = build_exports(work)
        binary = build_llama_tokenize(llama_cpp) if args.llama_tokenize else None
        for name, folder in exports.items():
            print(f"--- {name}: {folder.name}")
            gguf_path = convert(llama_cpp, folder)
            info = check_gguf(gguf_path, folder)
            if binary is not None:
                check_tokenization(binary, gguf_path, folder, info)
    except Exception as exc:  # noqa: BLE001 - one line per failure, for make
        print(f"FAIL  {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("clients: all checks passed" + ("" if binary else " (llama.cpp tokenization not run: --llama-tokenize)"))
    return 0


GGUF_SIDE = ROOT / "build" / "clients" / "side-gguf"

if __name__ == "__main__":
    sys.exit(main())
