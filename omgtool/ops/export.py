"""Exports: an InternLM2 folder as HF Llama, a finetune LoRA as a PEFT adapter for that Llama
layout, and any readable checkpoint as safetensors.

Every export plans its output first (names, shapes, dtypes), checks the inputs fit and the
disk has room, streams tensors one at a time into an atomic output, then re-reads the
written headers and compares them with the plan (a mismatch raises CheckFailed, exit 1).
Names, renames and splits come from `mappings/conv_internlm2_to_llama.toml` through
`omgtool.arch.convert` / `omgtool.kernels.transforms`; LoRA numerics from `omgtool.kernels.lora`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from omgtool import __version__
from omgtool.errors import CheckFailed, InvalidArgument, MismatchError, UnreadableInput
from omgtool.formats.jsonfile import read_json_object
from omgtool.formats.writer import DEFAULT_MAX_SHARD
from omgtool.sizes import size_on_disk

Progress = Callable[[str, int], None]  # (tensor name, bytes written)

# Source files a Llama export rewrites or drops instead of carrying.
REWRITTEN = {"config.json", "generation_config.json"}
PROVENANCE = "omgtool-export.json"
PROJECTOR_FILE = "projector.safetensors"
EXTRAS_FILE = "extras.safetensors"
UNCONVERTED_FILE = "unconverted.safetensors"


def _noop(name: str, nbytes: int) -> None:
    pass


@dataclass(frozen=True)
class _Stream:
    """One safetensors output: its plan and the (name, tensor) iterator that fills it."""

    stem: str
    plan: list  # [PlannedTensor]
    tensors: Iterable
    index: bool = True


def _write_streams(folder: Path, streams: list[_Stream], max_shard: int, metadata: dict[str, str],
                   progress: Progress) -> list[str]:
    """Write each stream with ShardedSafetensorsWriter, then verify every header against its plan."""
    from omgtool.formats.writer import ShardedSafetensorsWriter, verify_written

    written: list[str] = []
    for stream in streams:
        if not stream.plan:
            continue
        writer = ShardedSafetensorsWriter(folder, stream.plan, max_shard, stem=stream.stem,
                                          metadata=metadata, index=stream.index)
        try:
            for name, tensor in stream.tensors:
                writer.write(name, tensor)
                progress(name, tensor.numel() * tensor.element_size())
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        problems = verify_written(folder, files, stream.plan)
        if problems:
            shown = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise CheckFailed(f"written output does not match its plan: {shown}")
        written += files
    return written


def _releasing(ckpt, items: Iterable, sources: Callable[[str], Iterable[str]]):
    """Pass (name, tensor) through; once the writer has taken one, drop its source pages
    (Checkpoint.release), so memory holds the tensor being written, not every page read."""
    for name, tensor in items:
        yield name, tensor
        del tensor
        for source in sources(name):
            ckpt.release(source)


def _planned(name: str, shape, dtype: str):
    from omgtool.formats.writer import PlannedTensor

    return PlannedTensor(name, tuple(int(s) for s in shape), dtype)


def _hf_dtype(dtype: str | None) -> str | None:
    from omgtool.formats.dtypes import HF_CONFIG_NAMES

    return HF_CONFIG_NAMES.get(dtype) if dtype else None


def _user_dtype(dtype: str | None) -> str | None:
    from omgtool.formats.dtypes import parse_user_dtype

    return parse_user_dtype(dtype) if dtype else None


def _main_dtype(plan) -> str | None:
    by_bytes: Counter = Counter()
    for t in plan:
        by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _free_space(out: Path, needed: int) -> None:
    from omgtool.formats.writer import check_free_space

    check_free_space(Path(out).parent if not Path(out).exists() else Path(out), needed)


# --- InternLM2 folder -> HF Llama ---------------------------------------------------------

def export_llama(src: str | Path, out: str | Path, *, dtype: str | None = None,
                 max_shard_size: str | int = DEFAULT_MAX_SHARD, force: bool = False,
                 check_tokenizer: bool = True, progress: Progress = _noop) -> dict[str, Any]:
    """Write `out`, a LlamaForCausalLM folder, from the InternLM2 HF folder `src` (the base, or
    merge-lora's output). Returns the report (also written to out/omgtool-export.json)."""
    from omgtool.arch.convert import head_params, internlm2_to_llama, iter_converted, llama_config_dict, plan_conversion
    from omgtool.ops.tokenizer_export import TOKENIZER_FILES, check_tokenizer as tokenizer_differences, \
        write_llama_tokenizer
    from omgtool.formats import HF_INDEXES, open_checkpoint
    from omgtool.formats.writer import atomic_output_dir
    from omgtool.sizes import parse_size

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InvalidArgument(f"{src}: --to llama needs an InternLM2 HF model folder (config.json + weights)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InvalidArgument(f"--out {out} is inside the source folder {src}")
    ckpt = open_checkpoint(src)
    config = ckpt.metadata.get("config")
    if not isinstance(config, dict):
        raise UnreadableInput("folder has no config.json: cannot size the attention heads", src)
    if config.get("model_type") == "llama":
        raise InvalidArgument(f"{src}: config.json says model_type llama already; nothing to convert")
    conversion = internlm2_to_llama()
    params = head_params(config)
    out_dtype = _user_dtype(dtype)
    pieces, uncovered = plan_conversion(ckpt, conversion, params, out_dtype)
    targets = {p.target: p for p in pieces}
    for needed in ("model.embed_tokens.weight", "lm_head.weight"):
        if needed not in targets:
            raise InvalidArgument(f"{src}: not an InternLM2 model folder: no tensor maps to {needed} "
                                  f"(rules: mappings/conv_internlm2_to_llama.toml)")
    rows = targets["model.embed_tokens.weight"].shape[0]
    if targets["lm_head.weight"].shape[0] != rows:
        raise MismatchError(f"{src}: tok_embeddings has {rows} rows but output has "
                            f"{targets['lm_head.weight'].shape[0]}")
    notes: list[str] = []
    if config.get("vocab_size") not in (None, rows):
        notes.append(f"config.json says vocab_size {config.get('vocab_size')}; the embeddings have {rows} "
                     f"rows, so vocab_size {rows} is written")
    if uncovered:
        notes.append(f"{len(uncovered)} tensors no conversion rule covers are carried unchanged in "
                     f"{UNCONVERTED_FILE} (outside the model index): {', '.join(uncovered[:5])}"
                     + (" ..." if len(uncovered) > 5 else ""))
    model_plan = [_planned(p.target, p.shape, p.dtype) for p in pieces]
    source_of = {p.target: p.source for p in pieces}
    extra_plan = [_planned(n, ckpt.tensors[n].shape, ckpt.tensors[n].dtype) for n in uncovered]
    out_names = {"model.safetensors", "model.safetensors.index.json", UNCONVERTED_FILE, PROVENANCE} | \
        REWRITTEN | set(TOKENIZER_FILES)

    # What else is in the folder: weights (not carried), remote code (dropped), the rest (carried).
    weight_files = {Path(f).name for f in ckpt.files} | set(HF_INDEXES)
    carried, dropped = [], []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name in weight_files or name in REWRITTEN or name in TOKENIZER_FILES or name == PROVENANCE:
            continue
        if name.endswith(".py"):
            dropped.append(name)
        elif name in out_names or name.startswith("model-"):
            notes.append(f"{name} not carried: its name is an output name")
        elif entry.is_file() or entry.is_dir():
            carried.append(entry)
    if dropped:
        notes.append(f"InternLM2 remote code not carried: {', '.join(dropped)}")
    carried_bytes = sum(size_on_disk(p) for p in carried)
    max_shard = parse_size(max_shard_size)
    total = sum(t.nbytes for t in model_plan) + sum(t.nbytes for t in extra_plan)
    _free_space(out, total + carried_bytes)

    config_dtype = _hf_dtype(out_dtype or _main_dtype(model_plan))
    llama_config = llama_config_dict(config, conversion, vocab_size=rows, dtype=config_dtype)
    report: dict[str, Any] = {
        "kind": "llama", "source": str(src), "out": str(out), "conversion": conversion.name,
        "num_tensors": len(model_plan), "bytes": total, "dtype": config_dtype, "vocab_size": rows,
        "heads": params, "carried": [p.name for p in carried], "dropped": dropped,
    }
    metadata = {"format": "pt", "omgtool": f"export llama {__version__}", "source": src.name}

    def tokenizer(folder: Path) -> dict[str, Any]:
        tok = write_llama_tokenizer(src, folder)
        if check_tokenizer and tok.get("files") and (src / "tokenizer.model").is_file():
            diffs = tokenizer_differences(folder, src / "tokenizer.model", tok["added_tokens"])
            tok["check"] = "identical ids to SentencePiece on the probe set" if not diffs else diffs
            if diffs:
                notes.append(f"tokenizer: the exported tokenizer differs from SentencePiece on {len(diffs)} "
                             f"probes (first: {diffs[0]})")
        return tok

    from concurrent.futures import ThreadPoolExecutor

    with atomic_output_dir(out, force=force) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        _write_json(tmp / "config.json", llama_config)
        _write_generation_config(src, tmp, config)
        # the tokenizer (CPU) is built and checked while the tensors stream (mostly memory copies)
        tok_job = pool.submit(tokenizer, tmp)
        files = _write_streams(tmp, [
            _Stream("model", model_plan, _releasing(ckpt, iter_converted(ckpt, pieces, params),
                                                    lambda target: [source_of[target]])),
            _Stream(UNCONVERTED_FILE.removesuffix(".safetensors"), extra_plan,
                    _releasing(ckpt, ((n, ckpt.read(n)) for n in uncovered), lambda n: [n]), index=False),
        ], max_shard, metadata, progress)
        ckpt.close()
        tok = tok_job.result()
        notes += tok.get("notes", [])
        for entry in carried:
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, tmp / entry.name)
        report.update(files=files, tokenizer=tok, notes=notes)
        _write_json(tmp / PROVENANCE, {"omgtool": __version__, **report})
    return report


def _write_generation_config(src: Path, dst: Path, config: dict[str, Any]) -> None:
    path = src / "generation_config.json"
    gen = read_json_object(path) if path.is_file() else {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    gen.pop("transformers_version", None)
    _write_json(dst / "generation_config.json", gen)


# --- finetune LoRA -> PEFT adapter for the Llama layout ----------------------------------

def export_peft(ckpt_path: str | Path, base_llama: str | Path, out: str | Path, *, alpha: float | None = None,
                dtype: str | None = None, family: str | None = None, force: bool = False,
                progress: Progress = _noop) -> dict[str, Any]:
    """Write `out`, a PEFT LoRA adapter for the Llama export `base_llama`, from the LoRA in a
    finetune checkpoint. wqkv's LoRA becomes q/k/v LoRAs with A shared and B's rows split by
    the grouped layout; trained full weights (embeddings, lm_head) become modules_to_save,
    with a LoRA on such a module folded into it (W + scale*B@A in fp32, rounded once)."""
    from omgtool.arch.convert import head_params, internlm2_to_llama
    from omgtool.formats import open_checkpoint
    from omgtool.formats.dtypes import torch_dtype
    from omgtool.formats.writer import atomic_output_dir
    from omgtool.arch.infer import analyze, lora_scaling, resolve_alpha
    from omgtool.kernels.transforms import apply, convert_name, transform_shapes

    ckpt_path, base_llama, out = Path(ckpt_path), Path(base_llama), Path(out)
    ckpt = open_checkpoint(ckpt_path)
    analysis = analyze(ckpt, family=family, alpha=alpha)
    if any(m.role == "dora_magnitude" for m in analysis.matches.values()):
        raise InvalidArgument(f"{ckpt_path}: DoRA magnitude vectors present; a DoRA adapter is not a plain "
                              "LoRA and is not exported")
    llm = [p for p in analysis.lora_pairs if p.component == "llm"]
    if not llm:
        raise InvalidArgument(f"{ckpt_path}: no LoRA factors on the language model (family "
                              f"{analysis.family_name}, stage {analysis.stage}); nothing to export as an "
                              "adapter (use --to safetensors for the tensors as they are)")
    alpha_value, alpha_source = resolve_alpha(analysis.family, ckpt, alpha)
    if alpha_value is None:
        raise InvalidArgument(alpha_source)
    src_cfg = ckpt.metadata.get("adapter_config")
    src_cfg = src_cfg if isinstance(src_cfg, dict) else {}
    if src_cfg.get("alpha_pattern") and alpha is None:
        raise InvalidArgument(f"{ckpt_path}: the source adapter has a per-module alpha_pattern, which export "
                              "does not translate to the Llama module names; pass --alpha to use one alpha")
    use_rslora = bool(src_cfg.get("use_rslora"))

    base = open_checkpoint(base_llama)
    base_config = base.metadata.get("config")
    if not isinstance(base_config, dict):
        raise UnreadableInput("--base-llama folder has no config.json", base_llama)
    if base_config.get("model_type") != "llama":
        raise InvalidArgument(f"{base_llama}: --base-llama must be a Llama export (config.json model_type "
                              f"llama, from `omgtool export BASE --to llama`), got "
                              f"{base_config.get('model_type')!r}")
    params = head_params(base_config)
    conversion = internlm2_to_llama()
    out_dtype = _user_dtype(dtype)

    def convert(weight: str):
        conv = convert_name(conversion, weight)
        if conv is None:
            raise MismatchError(f"{ckpt_path}: LoRA target {weight} has no rule in "
                                f"mappings/{conversion.name} to the Llama layout")
        return conv

    def base_shape(target: str):
        info = base.tensors.get(target)
        if info is None:
            raise MismatchError(f"{base_llama} has no {target}, which the adapter targets")
        return info.shape

    pairs_by_weight = {p.weight: p for p in llm}
    full = [m for m in analysis.matches.values() if m.component == "llm" and m.role == "weight"]
    saved_weights = {m.weight: m.key for m in full}
    plan, jobs = [], []  # jobs: (conversion, source key, LoRA pair folded into it, dtype)
    sources_of: dict[str, list[str]] = {}  # output name -> source keys it was computed from
    saved_modules, resize_rows = [], None

    # modules_to_save: trained full weights (a LoRA on one is folded in).
    for weight, key in saved_weights.items():
        conv = convert(weight)
        info = ckpt.tensors[key]
        shapes = transform_shapes(conv.transform, info.shape, params)
        dt = out_dtype or info.dtype
        for target, shape in zip(conv.targets, shapes):
            want = base_shape(target)
            if tuple(shape[1:]) != tuple(want[1:]):
                raise MismatchError(f"{key} is {list(info.shape)} but {target} in {base_llama} is {list(want)}")
            if shape[0] != want[0]:
                if target not in ("model.embed_tokens.weight", "lm_head.weight"):
                    raise MismatchError(f"{key} is {list(info.shape)} but {target} in {base_llama} is "
                                        f"{list(want)}")
                if resize_rows not in (None, shape[0]):
                    raise MismatchError(f"embedding and lm_head rows differ ({resize_rows} vs {shape[0]})")
                resize_rows = shape[0]
            saved_modules.append(target.removesuffix(".weight"))
            plan.append(_planned(f"base_model.model.{target}", shape, dt))
        pair = pairs_by_weight.pop(weight, None)
        for target in conv.targets:
            sources_of[f"base_model.model.{target}"] = [key] + ([pair.a_key, pair.b_key] if pair else [])
        jobs.append((conv, key, pair, dt))

    # LoRA targets: A shared by every piece of a split, B's rows transformed like the weight.
    ranks: dict[str, int] = {}
    lora_jobs = []
    for pair in pairs_by_weight.values():
        conv = convert(pair.weight)
        a_info, b_info = ckpt.tensors[pair.a_key], ckpt.tensors[pair.b_key]
        b_shapes = transform_shapes(conv.transform, b_info.shape, params)
        for target, b_shape in zip(conv.targets, b_shapes):
            want = base_shape(target)
            if (b_shape[0], a_info.shape[1]) != tuple(want):
                raise MismatchError(f"LoRA on {pair.weight} gives {target} a [{b_shape[0]}, {a_info.shape[1]}] "
                                    f"update but {base_llama} has {list(want)}")
            module = target.removesuffix(".weight")
            ranks[module] = a_info.shape[0]
            plan.append(_planned(f"base_model.model.{module}.lora_A.weight", a_info.shape,
                                 out_dtype or a_info.dtype))
            plan.append(_planned(f"base_model.model.{module}.lora_B.weight", b_shape,
                                 out_dtype or b_info.dtype))
            sources_of[f"base_model.model.{module}.lora_A.weight"] = [pair.a_key]
            sources_of[f"base_model.model.{module}.lora_B.weight"] = [pair.b_key]
        lora_jobs.append((conv, pair))
    if not ranks:
        raise InvalidArgument(f"{ckpt_path}: every LoRA sits on a module saved in full; no adapter targets left")

    rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: r for m, r in ranks.items() if r != rank}
    target_modules = _module_names(sorted(ranks), base)
    modules_to_save = _module_names(saved_modules, base)
    folded = [p.weight for _, _, p, _ in jobs if p is not None]

    def tensors():  # yields in plan order: saved modules, then LoRA pairs
        from omgtool.kernels.lora import merge_lora

        for conv, key, pair, dt in jobs:
            w = ckpt.read(key)
            if pair is not None:
                a, b = ckpt.read(pair.a_key), ckpt.read(pair.b_key)
                w = merge_lora(w, a, b, lora_scaling(alpha_value, a.shape[0], ckpt), out_dtype=torch_dtype(dt))
            for target, piece in zip(conv.targets, apply(conv.transform, w, params)):
                yield f"base_model.model.{target}", piece.to(torch_dtype(dt))
        for conv, pair in lora_jobs:
            a, b = ckpt.read(pair.a_key), ckpt.read(pair.b_key)
            a_dt = torch_dtype(out_dtype or ckpt.tensors[pair.a_key].dtype)
            b_dt = torch_dtype(out_dtype or ckpt.tensors[pair.b_key].dtype)
            for target, b_piece in zip(conv.targets, apply(conv.transform, b, params)):
                module = target.removesuffix(".weight")
                yield f"base_model.model.{module}.lora_A.weight", a.to(a_dt)
                yield f"base_model.model.{module}.lora_B.weight", b_piece.to(b_dt)

    # Everything outside the language model is carried, never dropped.
    other = [m.key for m in analysis.matches.values() if m.component != "llm"]
    extras = list(analysis.unexplained)
    carry_plan = [_planned(k, ckpt.tensors[k].shape, ckpt.tensors[k].dtype) for k in other]
    extras_plan = [_planned(k, ckpt.tensors[k].shape, ckpt.tensors[k].dtype) for k in extras]
    total = sum(t.nbytes for t in plan + carry_plan + extras_plan)
    _free_space(out, total)

    base_name = str(base_llama.resolve())
    notes = list(analysis.notes)
    if folded:
        notes.append(f"LoRA on {', '.join(folded)} folded into the saved module (PEFT cannot hold a LoRA on a "
                     f"module it also saves whole): W + (alpha {alpha_value:g} / r) * B@A in float32, rounded once")
    load = _load_snippet(base_name, out, resize_rows)
    report: dict[str, Any] = {
        "kind": "peft", "source": str(ckpt_path), "base_model_name_or_path": base_name, "out": str(out),
        "r": rank, "rank_pattern": rank_pattern, "lora_alpha": alpha_value, "lora_alpha_source": alpha_source,
        "target_modules": target_modules, "modules_to_save": modules_to_save, "num_tensors": len(plan),
        "bytes": total, "resize_token_embeddings": resize_rows, "carried": {}, "load": load,
    }
    metadata = {"format": "pt", "omgtool": f"export peft {__version__}", "source": ckpt_path.name,
                "lora_alpha": f"{alpha_value:g}", "lora_alpha_source": alpha_source}
    with atomic_output_dir(out, force=force) as tmp:
        files = _write_streams(tmp, [
            _Stream("adapter_model", plan, _releasing(ckpt, tensors(), lambda name: sources_of[name]), index=False),
            _Stream(PROJECTOR_FILE.removesuffix(".safetensors"), carry_plan,
                    _releasing(ckpt, ((k, ckpt.read(k)) for k in other), lambda k: [k]), index=False),
            _Stream(EXTRAS_FILE.removesuffix(".safetensors"), extras_plan,
                    _releasing(ckpt, ((k, ckpt.read(k)) for k in extras), lambda k: [k]), index=False),
        ], 1 << 62, metadata, progress)
        ckpt.close()
        base.close()
        if carry_plan:
            report["carried"][PROJECTOR_FILE] = len(carry_plan)
        if extras_plan:
            report["carried"][EXTRAS_FILE] = len(extras_plan)
        _write_adapter_config(tmp, rank, alpha_value, target_modules, modules_to_save, rank_pattern, base_name,
                              use_rslora)
        report.update(files=files + ["adapter_config.json"], notes=notes)
        _write_json(tmp / PROVENANCE, {"omgtool": __version__, **report})
    return report


def _module_names(modules: list[str], base) -> list[str]:
    """Short names (q_proj) where they pick out exactly these modules of the base, else full paths."""
    from collections import defaultdict

    in_base: dict[str, set[str]] = defaultdict(set)
    for name in base.tensors:
        if name.endswith(".weight"):
            module = name.removesuffix(".weight")
            in_base[module.rsplit(".", 1)[-1]].add(module)
    chosen = set(modules)
    by_short: dict[str, set[str]] = defaultdict(set)
    for m in modules:
        by_short[m.rsplit(".", 1)[-1]].add(m)
    out = []
    for short, mods in sorted(by_short.items()):
        out += [short] if in_base.get(short) == mods else sorted(mods)
    assert set().union(*by_short.values()) == chosen
    return out


def _write_adapter_config(folder: Path, r: int, alpha: float, target_modules: list[str],
                          modules_to_save: list[str], rank_pattern: dict[str, int], base_name: str,
                          use_rslora: bool = False) -> None:
    from peft import LoraConfig

    lora_alpha = int(alpha) if float(alpha).is_integer() else alpha
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, modules_to_save=modules_to_save,
                        rank_pattern=rank_pattern, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_name, inference_mode=True, use_rslora=use_rslora)
    config.save_pretrained(str(folder))


def _load_snippet(base: str, adapter: Path, rows: int | None) -> str:
    lines = ["from transformers import AutoModelForCausalLM",
             "from peft import PeftModel",
             f"base = AutoModelForCausalLM.from_pretrained({base!r})"]
    if rows is not None:
        lines.append(f"base.resize_token_embeddings({rows})  # the checkpoint's embedding rows")
    lines.append(f"model = PeftModel.from_pretrained(base, {str(adapter)!r})")
    return "\n".join(lines)


# --- any checkpoint -> safetensors -------------------------------------------------------

def export_safetensors(path: str | Path, out: str | Path, *, force: bool = False,
                       max_shard_size: str | int = DEFAULT_MAX_SHARD, progress: Progress = _noop) -> dict[str, Any]:
    """Every tensor of a readable checkpoint, with identical names, shapes, dtypes and bytes.

    `out` ending in .safetensors is one file; anything else a folder (model.safetensors, or
    shards + index past --max-shard-size). Metadata records the source file name and sha256.
    Unsafe pickles are refused by the reader (UnsafeInput, exit 3) before anything is written.

    The sha256 is computed in a second thread while the tensors stream (hashlib releases the
    GIL); headers are written with fixed-width placeholders and patched in place afterwards.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from omgtool.formats import open_checkpoint
    from omgtool.formats.manifest import is_manifest
    from omgtool.formats.writer import atomic_output_dir
    from omgtool.sizes import parse_size

    path, out = Path(path), Path(out)
    ckpt = open_checkpoint(path)
    if is_manifest(ckpt):
        raise InvalidArgument(f"{path} is a shape manifest: it holds no values to export")
    plan = [_planned(n, t.shape, t.dtype) for n, t in ckpt.tensors.items()]
    if not plan:
        raise InvalidArgument(f"{path}: the checkpoint holds no tensors")
    single = out.suffix == ".safetensors"
    if single and out.is_dir():
        raise InvalidArgument(f"{out} is a folder; give a .safetensors file name or a folder without the suffix")
    if out.exists() and not force:
        raise InvalidArgument(f"{out} already exists (use --force to replace it)")
    total = sum(t.nbytes for t in plan)
    _free_space(out, total)
    files = [Path(f) for f in ckpt.files] or [path]
    names = [str(f.relative_to(path)) if path.is_dir() and f.is_relative_to(path) else f.name for f in files]
    pending = [f"sha256-pending-{i:049d}" for i in range(len(files))]
    metadata = {"format": "pt", "omgtool": f"export safetensors {__version__}"}
    if len(files) == 1:
        metadata["source"] = names[0]
        metadata["source_sha256"] = pending[0]
    else:
        metadata["source"] = path.name
        metadata["source_files"] = json.dumps(dict(zip(names, pending)))
    report: dict[str, Any] = {"kind": "safetensors", "source": str(path), "out": str(out), "num_tensors": len(plan),
                              "bytes": total, "container": ckpt.container, "notes": []}
    if ckpt.safety.verdict != "not-a-pickle":  # a torch pickle: its non-tensor entries are not tensors
        skipped = [k for k in ckpt.metadata if not (path.is_dir() and k in ("config", "adapter_config"))]
        if skipped:
            report["notes"].append(f"non-tensor entries not written: {', '.join(skipped[:20])}"
                                   + (" ..." if len(skipped) > 20 else ""))
    tensors = _releasing(ckpt, ((n, ckpt.read(n)) for n in ckpt.tensors), lambda n: [n])
    stop = threading.Event()

    def finish(folder: Path, written: list[str]) -> None:
        digests = hashing.result()
        final = {k: v for k, v in metadata.items()}
        for placeholder, digest in zip(pending, digests):
            final = {k: v.replace(placeholder, digest) for k, v in final.items()}
        for name in written:
            if name.endswith(".safetensors"):
                _patch_metadata(folder / name, metadata, final)
        report["metadata"] = final

    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(lambda: [_sha256_file(f, stop) for f in files])
        try:
            if single:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
                try:
                    written = _write_streams(tmp, [_Stream(out.name.removesuffix(".safetensors"), plan, tensors,
                                                           index=False)], 1 << 62, metadata, progress)
                    finish(tmp, written)
                    os.replace(tmp / written[0], out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                report["files"] = [out.name]
            else:
                with atomic_output_dir(out, force=force) as tmp:
                    report["files"] = _write_streams(tmp, [_Stream("model", plan, tensors)],
                                                     parse_size(max_shard_size), metadata, progress)
                    finish(tmp, report["files"])
        finally:
            stop.set()
    ckpt.close()
    return report


def _sha256_file(path: Path, stop=None, chunk: int = 64 << 20) -> str:
    """sha256 of a file through a read-only map, chunk by chunk, dropping each chunk's pages
    once hashed (memory stays at one chunk); no copies through Python bytes objects."""
    import hashlib
    import mmap

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for off in range(0, size, chunk):
                    if stop is not None and stop.is_set():
                        raise InterruptedError("hashing stopped")
                    h.update(view[off:off + chunk])
                    if hasattr(m, "madvise"):
                        m.madvise(mmap.MADV_DONTNEED, off, min(chunk, size - off))
            finally:
                view.release()
    return h.hexdigest()


def _patch_metadata(file: Path, planned: dict[str, str], final: dict[str, str]) -> None:
    """Replace the placeholder metadata in a written header with the final values (same
    byte length), then re-read the header to confirm."""
    import struct

    from omgtool.formats.safetensors_file import read_header

    old = json.dumps(planned, separators=(",", ":")).encode()
    new = json.dumps(final, separators=(",", ":")).encode()
    if len(old) != len(new):
        raise CheckFailed(f"{file.name}: metadata placeholder and value differ in length")
    with open(file, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        at = raw.find(old)
        if at < 0 or raw.find(old, at + 1) >= 0:
            raise CheckFailed(f"{file.name}: metadata placeholder not found once in the header")
        fh.seek(8 + at)
        fh.write(new)
    _, meta, _ = read_header(file)
    if meta != final:
        raise CheckFailed(f"{file.name}: metadata reads back as {meta}, not {final}")
