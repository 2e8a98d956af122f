"""Exports: an InternLM2 folder as HF Llama, a finetune LoRA as a PEFT adapter for that Llama
layout, and any readable checkpoint as safetensors.

Each export is a plan (`plan_llama`, `plan_peft`, `plan_safetensors`: names, shapes, dtypes,
sources and kernels, inputs checked; headers only, no torch, what --dry-run prints) and one
`omgtool.plan.execute.execute` (atomic output, free space, streamed shards, headers re-read
against the plan: a mismatch raises CheckFailed, exit 1, provenance). Names, renames and
splits come from the conversion mapping `mappings/conv_<source>_to_<target>.toml` through
`omgtool.arch.convert` / `omgtool.kernels.transforms`; LoRA meaning from `omgtool.kernels.lora`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from omgtool import __version__
from omgtool.errors import InvalidArgument, MismatchError, UnreadableInput
from omgtool.formats.jsonfile import read_json_object
from omgtool.formats.names import ADAPTER_CONFIG, CONFIG, EXPORT_RECORD, EXTRAS_FILE, GENERATION_CONFIG, \
    PROJECTOR_FILE, UNCONVERTED_FILE
from omgtool.formats.writer import DEFAULT_MAX_SHARD
from omgtool.plan.model import UNSHARDED, Artifact, Input, Plan, PlannedTensor, Source, TensorFile, main_dtype
from omgtool.progress import NULL_PROGRESS, Progress
from omgtool.sizes import format_size, size_on_disk

PROVENANCE = EXPORT_RECORD
# Source files a Llama export rewrites or drops instead of carrying.
REWRITTEN = {CONFIG, GENERATION_CONFIG}


def _stem(file_name: str) -> str:
    return file_name.removesuffix(".safetensors")


def _user_dtype(dtype: str | None) -> str | None:
    from omgtool.formats.dtypes import parse_user_dtype

    return parse_user_dtype(dtype) if dtype else None


def _hf_dtype(dtype: str | None) -> str | None:
    from omgtool.formats.dtypes import HF_CONFIG_NAMES

    return HF_CONFIG_NAMES.get(dtype) if dtype else None


def _copies(ckpt_input: str, ckpt, keys: list[str], file: str) -> list[PlannedTensor]:
    return [PlannedTensor(k, tuple(ckpt.tensors[k].shape), ckpt.tensors[k].dtype, (Source(ckpt_input, k),), "copy",
                          file=file, action="carried") for k in keys]


def _record(plan: Plan, report: dict[str, Any]):
    """The report builder for a folder export: the record is {"omgtool": version, **report}."""

    def build(run) -> dict[str, Any]:
        out = {"omgtool": __version__, **report, "files": run.files + plan.context.get("extra_files", [])}
        out["notes"] = plan.notes
        for name in plan.context.get("report_results", ()):
            if name in run.results:
                out[name] = run.results[name]
        return out

    return build


def _headline(kind: str, src: Path, out: Path, plan_tensors: list[PlannedTensor], extra: str = "") -> list[str]:
    total = sum(t.nbytes for t in plan_tensors)
    return [f"export {src} --to {kind} -> {out}" + (f" ({extra})" if extra else ""),
            f"output: {len(plan_tensors)} tensors, {format_size(total)}"]


# --- InternLM2 folder -> HF Llama ---------------------------------------------------------

def plan_llama(src: str | Path, out: str | Path, *, dtype: str | None = None,
               max_shard_size: str | int = DEFAULT_MAX_SHARD, check_tokenizer: bool = True) -> Plan:
    """The plan of `out`, a LlamaForCausalLM folder, from the InternLM2 HF folder `src` (the
    base, or merge-lora's output): the conversion's pieces, carried and dropped files."""
    from omgtool.arch.convert import conversion_for, head_params, plan_conversion, role_target
    from omgtool.formats import HF_INDEXES, open_checkpoint
    from omgtool.ops.tokenizer_export import TOKENIZER_FILES
    from omgtool.sizes import parse_size

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InvalidArgument(f"{src}: --to llama needs an InternLM2 HF model folder (config.json + weights)")
    ckpt = open_checkpoint(src)
    config = ckpt.metadata.get("config")
    if not isinstance(config, dict):
        raise UnreadableInput("folder has no config.json: cannot size the attention heads", src)
    if config.get("model_type") == "llama":
        raise InvalidArgument(f"{src}: config.json says model_type llama already; nothing to convert")
    conversion = conversion_for(config, "llama")
    params = head_params(config)
    out_dtype = _user_dtype(dtype)
    pieces, uncovered = plan_conversion(ckpt, conversion, params, out_dtype)
    targets = {p.name: p for p in pieces}
    emb_name, head_name = role_target(conversion, "embedding"), role_target(conversion, "head")
    for needed in (emb_name, head_name):
        if needed not in targets:
            raise InvalidArgument(f"{src}: not an InternLM2 model folder: no tensor maps to {needed} "
                                  f"(rules: mappings/conv_{conversion.source}_to_{conversion.target}.toml)")
    rows = targets[emb_name].shape[0]
    if targets[head_name].shape[0] != rows:
        raise MismatchError(f"{src}: the embeddings have {rows} rows but the head has {targets[head_name].shape[0]}")
    checks = [f"{len(pieces)} tensors from {conversion.name} rules; embeddings and head both {rows} rows"]
    notes: list[str] = []
    if config.get("vocab_size") not in (None, rows):
        notes.append(f"config.json says vocab_size {config.get('vocab_size')}; the embeddings have {rows} "
                     f"rows, so vocab_size {rows} is written")
    if uncovered:
        notes.append(f"{len(uncovered)} tensors no conversion rule covers are carried unchanged in "
                     f"{UNCONVERTED_FILE} (outside the model index): {', '.join(uncovered[:5])}"
                     + (" ..." if len(uncovered) > 5 else ""))
    tensors = pieces + _copies("src", ckpt, uncovered, _stem(UNCONVERTED_FILE))
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
    config_dtype = _hf_dtype(out_dtype or main_dtype(pieces))
    metadata = {"format": "pt", "omgtool": f"export llama {__version__}", "source": src.name}
    files = {"model": TensorFile("model", parse_size(max_shard_size), metadata=metadata),
             _stem(UNCONVERTED_FILE): TensorFile(_stem(UNCONVERTED_FILE), index=False, metadata=metadata)}

    def write_config(folder: Path, run) -> None:
        from omgtool.arch.convert import llama_config_dict
        from omgtool.formats.writer import write_json

        write_json(folder / CONFIG, llama_config_dict(config, conversion, vocab_size=rows, dtype=config_dtype,
                                                     name=out.name))
        _write_generation_config(src, folder, config)

    def tokenizer(folder: Path, run) -> dict[str, Any]:
        from omgtool.ops.tokenizer_export import check_tokenizer as tokenizer_differences, write_llama_tokenizer

        tok = write_llama_tokenizer(src, folder)
        if check_tokenizer and tok.get("files") and (src / "tokenizer.model").is_file():
            diffs = tokenizer_differences(folder, src / "tokenizer.model", tok["added_tokens"])
            tok["check"] = "identical ids to SentencePiece on the probe set" if not diffs else diffs
            if diffs:
                plan.notes.append(f"tokenizer: the exported tokenizer differs from SentencePiece on {len(diffs)} "
                                  f"probes (first: {diffs[0]})")
        plan.notes += tok.get("notes", [])
        return tok

    def copy_carried(folder: Path, run) -> None:
        for entry in carried:
            if entry.is_dir():
                shutil.copytree(entry, folder / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, folder / entry.name)

    artifacts = [Artifact(CONFIG, f"LlamaForCausalLM, vocab_size {rows}, dtype {config_dtype}; "
                                  f"{GENERATION_CONFIG}", write_config, 8192),
                 Artifact("tokenizer", "tokenizer.model + tokenizer.json, added tokens at their ids", tokenizer,
                          early=True)]
    if carried:
        artifacts.append(Artifact("carried", ", ".join(p.name for p in carried), copy_carried,
                                  sum(size_on_disk(p) for p in carried)))
    report: dict[str, Any] = {
        "kind": "llama", "source": str(src), "out": str(out), "conversion": conversion.name,
        "num_tensors": len(pieces), "bytes": sum(t.nbytes for t in tensors), "dtype": config_dtype,
        "vocab_size": rows, "heads": params, "carried": [p.name for p in carried], "dropped": dropped,
    }
    plan = Plan("export llama", {"src": Input("src", src, ckpt)}, tensors, files, artifacts, checks=checks,
                notes=notes, headline=_headline("llama", src, out, pieces, f"{conversion.name}, heads {params}"),
                facts=report, record=PROVENANCE, forbidden_parents={"source folder": src},
                context={"report_results": ["tokenizer"]})
    plan.report = _record(plan, report)
    return plan


def export_llama(src: str | Path, out: str | Path, *, dtype: str | None = None,
                 max_shard_size: str | int = DEFAULT_MAX_SHARD, force: bool = False,
                 check_tokenizer: bool = True, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Write `out`, a LlamaForCausalLM folder, from the InternLM2 HF folder `src`. Returns the
    report (also written to out/omgtool-export.json)."""
    from omgtool.plan.execute import execute

    plan = plan_llama(src, out, dtype=dtype, max_shard_size=max_shard_size, check_tokenizer=check_tokenizer)
    return execute(plan, out, force=force, progress=progress)


def _write_generation_config(src: Path, dst: Path, config: dict[str, Any]) -> None:
    from omgtool.formats.writer import write_json

    path = src / GENERATION_CONFIG
    gen = read_json_object(path) if path.is_file() else {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    gen.pop("transformers_version", None)
    write_json(dst / GENERATION_CONFIG, gen)


# --- finetune LoRA -> PEFT adapter for the Llama layout ----------------------------------

def plan_peft(ckpt_path: str | Path, base_llama: str | Path, out: str | Path, *, alpha: float | None = None,
              dtype: str | None = None, family: str | None = None) -> Plan:
    """The plan of `out`, a PEFT LoRA adapter for the Llama export `base_llama`, from the LoRA in a
    finetune checkpoint. wqkv's LoRA becomes q/k/v LoRAs with A shared and B's rows split by
    the grouped layout; trained full weights (embeddings, lm_head) become modules_to_save,
    with a LoRA on such a module folded into it (W + scale*B@A in fp32, rounded once)."""
    from omgtool.arch.convert import conversion_between, convert_name, head_params, role_target
    from omgtool.arch.infer import analyze, resolve_alpha
    from omgtool.formats import open_checkpoint
    from omgtool.arch.infer import adapter_settings
    from omgtool.kernels.lora import is_transposed, module_scale
    from omgtool.kernels.transforms import transform_shapes

    ckpt_path, base_llama, out = Path(ckpt_path), Path(base_llama), Path(out)
    ckpt = open_checkpoint(ckpt_path)
    analysis = analyze(ckpt, family=family, alpha=alpha)
    if any(m.role == "dora_magnitude" for m in analysis.matches.values()):
        raise InvalidArgument(f"{ckpt_path}: DoRA magnitude vectors present; a DoRA adapter is not a plain "
                              "LoRA and is not exported")
    llm_comp = analysis.family.language_model if analysis.family is not None else None
    llm = [p for p in analysis.lora_pairs if llm_comp is not None and p.component == llm_comp.name]
    if not llm:
        raise InvalidArgument(f"{ckpt_path}: no LoRA factors on the language model (family "
                              f"{analysis.family_name}, stage {analysis.stage}); nothing to export as an "
                              "adapter (use --to safetensors for the tensors as they are)")
    alpha_value, alpha_source = resolve_alpha(analysis.family, ckpt, alpha)
    if alpha_value is None:
        raise InvalidArgument(alpha_source)
    settings = adapter_settings(ckpt)
    if settings.alpha_pattern and alpha is None:
        raise InvalidArgument(f"{ckpt_path}: the source adapter has a per-module alpha_pattern, which export "
                              "does not translate to the Llama module names; pass --alpha to use one alpha")

    base = open_checkpoint(base_llama)
    base_config = base.metadata.get("config")
    if not isinstance(base_config, dict):
        raise UnreadableInput("--base-llama folder has no config.json", base_llama)
    if base_config.get("model_type") != "llama":
        raise InvalidArgument(f"{base_llama}: --base-llama must be a Llama export (config.json model_type "
                              f"llama, from `omgtool export BASE --to llama`), got "
                              f"{base_config.get('model_type')!r}")
    params = head_params(base_config)
    conversion = conversion_between(llm_comp.architecture, "llama")
    vocab_sized = {role_target(conversion, "embedding"), role_target(conversion, "head")}
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
    full = [m for m in analysis.matches.values() if m.component == llm_comp.name and m.role == "weight"]
    tensors: list[PlannedTensor] = []
    saved_modules, resize_rows, folded = [], None, []

    # modules_to_save: trained full weights (a LoRA on one is folded in).
    for m in full:
        conv = convert(m.weight)
        info = ckpt.tensors[m.key]
        shapes = transform_shapes(conv.transform, info.shape, params)
        pair = pairs_by_weight.pop(m.weight, None)
        # a folded LoRA stays float32 (unless --dtype): rounding it to the checkpoint's bf16 would
        # lose the precision that base + unmerged LoRA has
        dt = out_dtype or ("F32" if pair is not None else info.dtype)
        sources = (Source("checkpoint", m.key),)
        fold: dict[str, Any] = {}
        if pair is not None:
            rank = ckpt.tensors[pair.a_key].shape[0]
            _, scale = module_scale(m.weight.removesuffix(".weight"), alpha_value, rank, settings, alpha is not None)
            sources += (Source("checkpoint", pair.a_key), Source("checkpoint", pair.b_key))
            fold = {"scale": scale, "transposed": is_transposed(pair.a_key, settings)}
            folded.append(pair.weight)
        for index, (target, shape) in enumerate(zip(conv.targets, shapes)):
            want = base_shape(target)
            if tuple(shape[1:]) != tuple(want[1:]):
                raise MismatchError(f"{m.key} is {list(info.shape)} but {target} in {base_llama} is {list(want)}")
            if shape[0] != want[0]:
                if target not in vocab_sized:
                    raise MismatchError(f"{m.key} is {list(info.shape)} but {target} in {base_llama} is "
                                        f"{list(want)}")
                if resize_rows not in (None, shape[0]):
                    raise MismatchError(f"embedding and lm_head rows differ ({resize_rows} vs {shape[0]})")
                resize_rows = shape[0]
            saved_modules.append(target.removesuffix(".weight"))
            tensors.append(PlannedTensor(f"base_model.model.{target}", tuple(shape), dt, sources, "transform",
                                         conv.transform, {"index": index, "heads": params, **fold},
                                         file="adapter_model", action="saved",
                                         detail="+ its LoRA folded in" if fold else ""))

    # LoRA targets: A shared by every piece of a split, B's rows transformed like the weight.
    ranks: dict[str, int] = {}
    for pair in pairs_by_weight.values():
        conv = convert(pair.weight)
        a_info, b_info = ckpt.tensors[pair.a_key], ckpt.tensors[pair.b_key]
        b_shapes = transform_shapes(conv.transform, b_info.shape, params)
        for index, (target, b_shape) in enumerate(zip(conv.targets, b_shapes)):
            want = base_shape(target)
            if (b_shape[0], a_info.shape[1]) != tuple(want):
                raise MismatchError(f"LoRA on {pair.weight} gives {target} a [{b_shape[0]}, {a_info.shape[1]}] "
                                    f"update but {base_llama} has {list(want)}")
            module = target.removesuffix(".weight")
            ranks[module] = a_info.shape[0]
            tensors.append(PlannedTensor(f"base_model.model.{module}.lora_A.weight", tuple(a_info.shape),
                                         out_dtype or a_info.dtype, (Source("checkpoint", pair.a_key),), "copy",
                                         file="adapter_model", action="lora"))
            tensors.append(PlannedTensor(f"base_model.model.{module}.lora_B.weight", tuple(b_shape),
                                         out_dtype or b_info.dtype, (Source("checkpoint", pair.b_key),),
                                         "transform", conv.transform, {"index": index, "heads": params},
                                         file="adapter_model", action="lora"))
    if not ranks:
        raise InvalidArgument(f"{ckpt_path}: every LoRA sits on a module saved in full; no adapter targets left")

    rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: r for m, r in ranks.items() if r != rank}
    target_modules = _module_names(sorted(ranks), base)
    modules_to_save = _module_names(saved_modules, base)

    # Everything outside the language model is carried, never dropped.
    other = [m.key for m in analysis.matches.values() if m.component != llm_comp.name]
    tensors += _copies("checkpoint", ckpt, other, _stem(PROJECTOR_FILE))
    tensors += _copies("checkpoint", ckpt, list(analysis.unexplained), _stem(EXTRAS_FILE))
    base_name = str(base_llama.resolve())
    notes = list(analysis.notes)
    if folded:
        notes.append(f"LoRA on {', '.join(folded)} folded into the saved module (PEFT cannot hold a LoRA on a "
                     f"module it also saves whole): W + (alpha {alpha_value:g} / r) * B@A in float32"
                     + (f", rounded once to {out_dtype} (--dtype)" if out_dtype else ", kept in float32"))
    metadata = {"format": "pt", "omgtool": f"export peft {__version__}", "source": ckpt_path.name,
                "lora_alpha": f"{alpha_value:g}", "lora_alpha_source": alpha_source}
    files = {stem: TensorFile(stem, index=False, metadata=metadata)
             for stem in ("adapter_model", _stem(PROJECTOR_FILE), _stem(EXTRAS_FILE))}
    carried = {name: n for name, n in ((PROJECTOR_FILE, len(other)), (EXTRAS_FILE, len(analysis.unexplained))) if n}
    report: dict[str, Any] = {
        "kind": "peft", "source": str(ckpt_path), "base_model_name_or_path": base_name, "out": str(out),
        "r": rank, "rank_pattern": rank_pattern, "lora_alpha": alpha_value, "lora_alpha_source": alpha_source,
        "target_modules": target_modules, "modules_to_save": modules_to_save,
        "num_tensors": len(tensors) - sum(carried.values()), "bytes": sum(t.nbytes for t in tensors),
        "resize_token_embeddings": resize_rows, "carried": carried, "load": _load_snippet(base_name, out, resize_rows),
    }

    def adapter_config(folder: Path, run) -> None:
        _write_adapter_config(folder, rank, alpha_value, target_modules, modules_to_save, rank_pattern, base_name,
                              settings.use_rslora)

    artifacts = [Artifact(ADAPTER_CONFIG, f"r {rank}, lora_alpha {alpha_value:g}, target_modules "
                                          f"{', '.join(target_modules)}; modules_to_save {', '.join(modules_to_save)}",
                          adapter_config, 4096)]
    main = [t for t in tensors if t.file == "adapter_model"]
    plan = Plan("export peft", {"checkpoint": Input("checkpoint", ckpt_path, ckpt),
                                "base_llama": Input("base_llama", base_llama, base, hash=False)},
                tensors, files, artifacts,
                checks=[f"{len(ranks)} LoRA targets and {len(saved_modules)} saved modules fit {base_llama}"],
                notes=notes, headline=_headline("peft", ckpt_path, out, main, f"LoRA r {rank}, alpha "
                                                f"{alpha_value:g} from {alpha_source}"),
                facts=report, record=PROVENANCE, main_file="adapter_model",
                context={"extra_files": [ADAPTER_CONFIG]})
    plan.report = _record(plan, report)
    return plan


def export_peft(ckpt_path: str | Path, base_llama: str | Path, out: str | Path, *, alpha: float | None = None,
                dtype: str | None = None, family: str | None = None, force: bool = False,
                progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Write `out`, a PEFT LoRA adapter (see plan_peft). Returns the report."""
    from omgtool.plan.execute import execute

    plan = plan_peft(ckpt_path, base_llama, out, alpha=alpha, dtype=dtype, family=family)
    return execute(plan, out, force=force, progress=progress)


def _module_names(modules: list[str], base) -> list[str]:
    """Short names (q_proj) where they pick out exactly these modules of the base, else full paths."""
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

def plan_safetensors(path: str | Path, out: str | Path, *, max_shard_size: str | int = DEFAULT_MAX_SHARD) -> Plan:
    """Every tensor of a readable checkpoint, with identical names, shapes, dtypes and bytes.

    `out` ending in .safetensors is one file; anything else a folder (model.safetensors, or
    shards + index past --max-shard-size). Metadata records the source file name and sha256
    (hashed while the tensors stream, then patched into the fixed-width header placeholders).
    Unsafe pickles are refused by the reader (UnsafeInput, exit 3) before anything is written.
    """
    from omgtool.formats import open_checkpoint
    from omgtool.formats.manifest import is_manifest
    from omgtool.plan.execute import pending_sha256
    from omgtool.sizes import parse_size

    path, out = Path(path), Path(out)
    ckpt = open_checkpoint(path)
    if is_manifest(ckpt):
        raise InvalidArgument(f"{path} is a shape manifest: it holds no values to export")
    if not ckpt.tensors:
        raise InvalidArgument(f"{path}: the checkpoint holds no tensors")
    single = out.suffix == ".safetensors"
    if single and out.is_dir():
        raise InvalidArgument(f"{out} is a folder; give a .safetensors file name or a folder without the suffix")
    source = Input("source", path, ckpt)
    files = source.files()
    names = [source.label(f) for f in files]
    pending = {pending_sha256(i): f"source:{n}" for i, n in enumerate(names)}
    placeholders = list(pending)
    metadata = {"format": "pt", "omgtool": f"export safetensors {__version__}"}
    if len(files) == 1:
        metadata["source"] = names[0]
        metadata["source_sha256"] = placeholders[0]
    else:
        metadata["source"] = path.name
        metadata["source_files"] = json.dumps(dict(zip(names, placeholders)))
    stem = _stem(out.name) if single else "model"
    tensors = [PlannedTensor(n, tuple(t.shape), t.dtype, (Source("source", n),), "copy", file=stem)
               for n, t in ckpt.tensors.items()]
    report: dict[str, Any] = {"kind": "safetensors", "source": str(path), "out": str(out), "num_tensors": len(tensors),
                              "bytes": sum(t.nbytes for t in tensors), "container": ckpt.container, "notes": []}
    if ckpt.safety.verdict != "not-a-pickle":  # a torch pickle: its non-tensor entries are not tensors
        skipped = [k for k in ckpt.metadata if not (path.is_dir() and k in ("config", "adapter_config"))]
        if skipped:
            report["notes"].append(f"non-tensor entries not written: {', '.join(skipped[:20])}"
                                   + (" ..." if len(skipped) > 20 else ""))
    tf = TensorFile(stem, UNSHARDED if single else parse_size(max_shard_size), index=not single, metadata=metadata)
    plan = Plan("export safetensors", {"source": source}, tensors, {stem: tf}, notes=report["notes"],
                headline=_headline("safetensors", path, out, tensors, "one file" if single else "a folder"),
                facts=report, single_file=single, main_file=stem, context={"pending_sha256": pending},
                checks=["every tensor's extent lies inside its storage (reader)"])

    def build(run) -> dict[str, Any]:
        return {**report, "files": [out.name] if single else run.files, "metadata": run.results.get("metadata")}

    plan.report = build
    return plan


def export_safetensors(path: str | Path, out: str | Path, *, force: bool = False,
                       max_shard_size: str | int = DEFAULT_MAX_SHARD, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Write every tensor of `path` as safetensors (see plan_safetensors). Returns the report."""
    from omgtool.plan.execute import execute

    return execute(plan_safetensors(path, out, max_shard_size=max_shard_size), out, force=force, progress=progress)
