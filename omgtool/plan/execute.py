"""execute(plan, out): the one way omgtool writes an output.

It owns, in this order: the --out checks (exists without --force, inside an input folder),
the free-space check, device resolution, sha256 of the inputs on a background thread, the
atomic output folder (nothing appears at `out` unless everything succeeded), the sharded
safetensors writer fed by each tensor's kernel (pages of the sources released as blocks
are written), re-reading every written header against the plan (CheckFailed, exit 1), the
other artifacts, sha256 of every output file (each closed shard hashed while the next is
written), and the provenance record.
"""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omgtool import __version__
from omgtool.errors import CheckFailed, InvalidArgument
from omgtool.plan.model import Plan, Source
from omgtool.progress import NULL_PROGRESS, Progress

PENDING = "sha256-pending-"  # metadata placeholder: PENDING + 49 digits = a sha256's 64 characters


def pending_sha256(n: int) -> str:
    """The n-th placeholder a TensorFile's metadata may hold for an input file's sha256
    (filled in once the input is hashed: Plan.context["pending_sha256"] maps it to a label)."""
    return f"{PENDING}{n:049d}"


@dataclass
class Run:
    """What kernels and artifacts see while a plan executes."""

    plan: Plan
    out: Path
    folder: Path
    device: str
    started: datetime.datetime
    results: dict[str, Any] = field(default_factory=dict)  # artifact name -> what its write returned
    records: dict[str, Any] = field(default_factory=dict)  # kernels' side records (LoRA delta norms)
    files: list[str] = field(default_factory=list)  # safetensors files written (+ indexes)
    cache_key: Any = None
    cache: Any = None

    def read(self, source: Source):
        return self.plan.inputs[source.input].checkpoint.read(source.key)

    def release(self, sources) -> None:
        for s in sources:
            self.plan.inputs[s.input].checkpoint.release(s.key)


def _check_out(plan: Plan, out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InvalidArgument(f"{out} already exists (use --force to replace it)")
    if plan.single_file and out.is_dir():
        raise InvalidArgument(f"{out} is a folder; give a .safetensors file name or a folder without the suffix")
    resolved = out.resolve()
    for what, parent in plan.forbidden_parents.items():
        if resolved == Path(parent).resolve() or Path(parent).resolve() in resolved.parents:
            raise InvalidArgument(f"--out {out} is inside the {what} {parent}")


def _free_space(out: Path, needed: int) -> None:
    from omgtool.formats.writer import check_free_space

    check_free_space(out if out.exists() else out.parent, needed)


def execute(plan: Plan, out: str | Path, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Write `out` as planned; returns the report (also written as plan.record, if any)."""
    from omgtool.formats.hashing import BackgroundHasher
    from omgtool.kernels.device import resolve_device

    out = Path(out)
    _check_out(plan, out, force)
    _free_space(out, plan.total_bytes + plan.artifact_bytes + (16 << 20))
    device = resolve_device(plan.device) if any(t.kernel == "lora_merge" for t in plan.tensors) else "cpu"
    run = Run(plan, out, Path(), device, datetime.datetime.now(datetime.timezone.utc))
    inputs_hasher, outputs_hasher = BackgroundHasher(), BackgroundHasher()
    for inp in plan.inputs.values():
        if inp.hash:
            for f in inp.files():
                inputs_hasher.submit(f"{inp.name}:{inp.label(f)}", f)
    try:
        with _output_folder(out, force, plan.single_file) as tmp:
            run.folder = tmp
            report = _write(plan, run, inputs_hasher, outputs_hasher, progress)
    except BaseException:
        inputs_hasher.cancel()
        outputs_hasher.cancel()
        raise
    finally:
        plan.close()
    return report


def _write(plan: Plan, run: Run, inputs_hasher, outputs_hasher, progress: Progress) -> dict[str, Any]:
    from omgtool.formats.writer import write_json

    tmp = run.folder
    pending = plan.context.get("pending_sha256") or {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        early = {a.name: pool.submit(a.write, tmp, run) for a in plan.artifacts if a.early}
        progress.task(plan.command, total=plan.total_bytes)
        for tf in plan.files.values():
            files = _write_tensor_file(plan, run, tf, outputs_hasher if not pending else None, progress)
            run.files += files
        progress.close()
        for name, job in early.items():
            run.results[name] = job.result()
    input_hashes = inputs_hasher.finish() if pending else None
    if pending:
        _fill_pending(plan, run, pending, input_hashes)
        for f in run.files:
            outputs_hasher.submit(f, tmp / f)
    for a in plan.artifacts:
        if not a.early:
            run.results[a.name] = a.write(tmp, run)
    if plan.single_file:  # the header carries the provenance; no record beside it
        outputs_hasher.cancel()
        if input_hashes is None:
            inputs_hasher.cancel()
        return plan.report(run) if plan.report else {}
    for p in sorted(tmp.rglob("*")):
        rel = str(p.relative_to(tmp))
        if p.is_file() and rel != plan.record:
            outputs_hasher.submit(rel, p)
    report = plan.report(run) if plan.report else {}
    hashes = input_hashes if input_hashes is not None else inputs_hasher.finish()
    for inp in plan.inputs.values():
        mine = {k.split(":", 1)[1]: v for k, v in hashes.items() if k.startswith(f"{inp.name}:")}
        if not inp.hash:
            continue
        if isinstance(report.get(inp.name), dict):
            report[inp.name]["files"] = mine
        else:
            report.setdefault("inputs", {})[inp.name] = {"path": str(inp.path.resolve()), "files": mine}
    report["outputs"] = dict(sorted(outputs_hasher.finish().items()))
    finished = datetime.datetime.now(datetime.timezone.utc)
    report["finished"] = finished.isoformat(timespec="seconds")
    report["wall_s"] = round((finished - run.started).total_seconds(), 3)
    if plan.record:
        write_json(tmp / plan.record, report)
    return report


def _write_tensor_file(plan: Plan, run: Run, tf, hasher, progress: Progress) -> list[str]:
    from omgtool.formats.writer import ShardedSafetensorsWriter, verify_written
    from omgtool.plan.kernels import KERNELS

    tensors = plan.tensors_of(tf.stem)
    if not tensors:
        return []
    writer = ShardedSafetensorsWriter(run.folder, tensors, tf.max_shard_bytes, stem=tf.stem, metadata=tf.metadata,
                                      index=tf.index)
    first_of_shard = {shard[0].name: n for n, shard in enumerate(writer.shards) if shard and n > 0}
    try:
        for t in tensors:
            blocks = KERNELS[t.kernel](t, run)
            if not t.shape:
                writer.write(t.name, next(iter(blocks)))
            else:
                writer.write_rows(t.name, blocks)
            run.release(t.sources)
            if hasher is not None and t.name in first_of_shard:  # the previous shard is closed
                done = writer.files[first_of_shard[t.name] - 1]
                hasher.submit(done, run.folder / done)
            progress.advance(t.nbytes)
        if run.cache_key is not None:
            run.release(run.cache_key[0])
            run.cache_key = run.cache = None
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    problems = verify_written(run.folder, files, tensors)
    if problems:
        shown = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckFailed(f"written output does not match its plan: {shown}")
    if hasher is not None:
        for f in files:
            hasher.submit(f, run.folder / f)
    return files


def _fill_pending(plan: Plan, run: Run, pending: dict[str, str], hashes: dict[str, dict]) -> None:
    from omgtool.formats.writer import patch_metadata

    for tf in plan.files.values():
        final = dict(tf.metadata)
        for placeholder, label in pending.items():
            digest = hashes[label]["sha256"]
            final = {k: v.replace(placeholder, digest) for k, v in final.items()}
        if final == tf.metadata:
            continue
        for name in run.files:
            if name.endswith(".safetensors"):
                patch_metadata(run.folder / name, tf.metadata, final)
        run.results["metadata"] = final


def _output_folder(out: Path, force: bool, single_file: bool):
    """The atomic output (omgtool.formats.output_dir): a folder, or for a single .safetensors
    file a temporary sibling folder whose one file replaces `out` at the end."""
    from omgtool.formats.output_dir import atomic_output_dir, atomic_output_file

    return (atomic_output_file if single_file else atomic_output_dir)(out, force=force)


def provenance(command: str) -> dict[str, Any]:
    """The fields every record starts with."""
    return {"tool": "omgtool", "version": __version__, "command": command}
