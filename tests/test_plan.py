"""The plan layer: plans import no torch and say exactly what execute() writes; the kernels,
the writer, the transforms, the hasher and the mapping schema against independent oracles
(plain torch, the safetensors library, hashlib, PEFT)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.cli_helpers import ok, one_line_error, run
from tests.paths import BASE, FINETUNE, ROOT

# Runs the CLI in a fresh interpreter and reports which heavy modules got imported.
_NO_TORCH = """
import json, sys
from typer.testing import CliRunner
from omgtool.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "safetensors", "numpy"))
print(json.dumps({"exit_code": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def _fresh(*args) -> dict:
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def base_llama(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "base-llama"
    ok("export", BASE, "--to", "llama", "--out", out)
    return out


DRY_RUNS = {
    "merge-lora": lambda tmp, llama: ["merge-lora", FINETUNE, "--base", BASE, "--out", tmp / "o"],
    "merge-lora nf4-dequant": lambda tmp, llama: ["merge-lora", FINETUNE, "--base", BASE, "--out", tmp / "o",
                                                  "--base-weights", "nf4-dequant"],
    "export llama": lambda tmp, llama: ["export", BASE, "--to", "llama", "--out", tmp / "o"],
    "export peft": lambda tmp, llama: ["export", FINETUNE, "--to", "peft", "--base-llama", llama, "--out", tmp / "o"],
    "export safetensors file": lambda tmp, llama: ["export", FINETUNE, "--to", "safetensors",
                                                   "--out", tmp / "o.safetensors"],
    "export safetensors folder": lambda tmp, llama: ["export", BASE, "--to", "safetensors", "--out", tmp / "o"],
}


@pytest.mark.parametrize("kind", list(DRY_RUNS))
def test_dry_run_imports_no_torch_and_writes_nothing(kind, tmp_path, base_llama):
    args = DRY_RUNS[kind](tmp_path, base_llama)
    for extra in ([], ["--json"]):
        got = _fresh(*args, "--dry-run", *extra)
        assert got["exit_code"] == 0, got["output"]
        assert got["heavy"] == [], f"{kind} --dry-run imported {got['heavy'][:5]}"
        assert list(tmp_path.iterdir()) == []
    plan = json.loads(got["output"])
    assert plan["dry_run"] is True and plan["bytes"] > 0 and plan["command"].startswith(kind.split()[0])


@pytest.mark.parametrize("kind", list(DRY_RUNS))
def test_plan_is_what_gets_written(kind, tmp_path, base_llama):
    """Every planned tensor is in the output with the planned shape and dtype, and nothing else."""
    args = DRY_RUNS[kind](tmp_path, base_llama)
    plan = json.loads(ok(*args, "--dry-run", "--json").stdout)
    ok(*args)
    out = Path(args[args.index("--out") + 1])
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    written = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                written[k] = fh.get_slice(k)
    assert sum(plan["files"].values()) == len(written)
    planned = {t["name"]: (t["shape"], t["dtype"]) for t in plan["planned"]}
    assert planned == {k: (s.get_shape(), s.get_dtype()) for k, s in written.items()}
    if kind.startswith("merge-lora"):
        assert plan["counts"]["merged"] + plan["counts"]["replaced"] + plan["counts"]["copied"] \
            + plan["counts"]["projector.safetensors"] == len(written)


def test_describe_lists_each_output_tensor_once():
    from omgtool.ops.export import plan_llama

    plan = plan_llama(BASE, "/nonexistent/out")
    text = plan.describe()
    assert "split        6" in text and "renamed     15" in text
    assert {t.name for t in plan.tensors if t.file == "model"} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(t.kernel == "transform" for t in plan.tensors)
    plan.close()


def test_export_dry_run_refuses_bad_arguments_like_the_real_run(tmp_path):
    one_line_error(run("export", FINETUNE, "--to", "llama", "--out", tmp_path / "o", "--dry-run"), 2, "InternLM2")
    assert list(tmp_path.iterdir()) == []


# --- execute, kernels: synthetic plans against plain torch --------------------------------

def _source(tmp_path: Path, tensors: dict) -> Path:
    path = tmp_path / "src.safetensors"
    save_file(tensors, str(path))
    return path


def _plan(path: Path, planned: list, max_shard: int = 1 << 62):
    from omgtool.formats import open_checkpoint
    from omgtool.plan.model import Input, Plan, TensorFile

    files = {}
    for t in planned:
        files.setdefault(t.file, TensorFile(t.file, max_shard))
    return Plan("test", {"src": Input("src", path, open_checkpoint(path))}, planned, files, record="record.json",
                report=lambda run: {"files": run.files, "deltas": run.records.get("deltas")})


def test_kernels_match_plain_torch(tmp_path):
    from omgtool.plan.execute import execute
    from omgtool.plan.model import PlannedTensor, Source

    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    a, b = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    emb = torch.randn(50, 6, generator=g)
    ea, eb = torch.randn(3, 50, generator=g), torch.randn(6, 3, generator=g)  # PEFT embedding LoRA: A [r, rows]
    qkv = torch.randn((4 + 2 * 2) * 3, 5, generator=g)
    path = _source(tmp_path, {"w": w, "a": a, "b": b, "emb": emb, "ea": ea, "eb": eb, "qkv": qkv,
                              "scalar": torch.tensor(3.5)})
    S = lambda k: Source("src", k)  # noqa: E731
    heads = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 3}
    planned = [
        PlannedTensor("w32", (40, 24), "F32", (S("w"),), "copy"),
        PlannedTensor("merged", (40, 24), "F32", (S("w"), S("a"), S("b")), "lora_merge",
                      params={"scale": 0.75, "transposed": False, "rank": 4, "alpha": 3.0}),
        PlannedTensor("emb_merged", (50, 6), "F32", (S("emb"), S("ea"), S("eb")), "lora_merge",
                      params={"scale": 2.0, "transposed": True, "rank": 3, "alpha": 6.0}),
        *[PlannedTensor(n, (s * 3, 5), "F16", (S("qkv"),), "transform", "split_grouped_qkv",
                        {"index": i, "heads": heads}, file="split") for i, (n, s) in enumerate(
            [("q", 4), ("k", 2), ("v", 2)])],
        PlannedTensor("scalar", (), "F32", (S("scalar"),), "copy", file="split"),
    ]
    report = execute(_plan(path, planned, max_shard=4000), tmp_path / "out")
    out = tmp_path / "out"
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert torch.equal(got["w32"], w.float())
    want = (w.double() + 0.75 * (b.double() @ a.double())).float()
    torch.testing.assert_close(got["merged"], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["emb_merged"], (emb.double() + 2.0 * (eb.double() @ ea.double()).T).float(),
                               rtol=1e-6, atol=1e-6)
    # InternLM2's grouping: per kv head h, rows [q_{2h}, q_{2h+1}, k_h, v_h] of head_dim 3 each
    blocks = qkv.view(2, 4, 3, 5)
    assert torch.equal(got["q"], blocks[:, :2].reshape(-1, 5).half())
    assert torch.equal(got["k"], blocks[:, 2].reshape(-1, 5).half())
    assert torch.equal(got["v"], blocks[:, 3].reshape(-1, 5).half())
    assert got["scalar"].item() == 3.5
    # the record: delta norms (Gram identity vs the formed product), sha256 of each file
    delta = report["deltas"]["merged"]["frobenius_norm"]
    assert delta == pytest.approx(float((0.75 * b.double() @ a.double()).norm()), rel=1e-9)
    record = json.loads((out / "record.json").read_text())
    assert len(report["files"]) > 2  # sharded at 4000 bytes: several model shards + index
    for name, entry in record["outputs"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert record["inputs"]["src"]["files"]["src.safetensors"]["sha256"] == \
        hashlib.sha256(path.read_bytes()).hexdigest()


def test_execute_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from omgtool.errors import InvalidArgument
    from omgtool.plan import kernels
    from omgtool.plan.execute import execute
    from omgtool.plan.model import PlannedTensor, Source

    path = _source(tmp_path, {"x": torch.ones(4, 4)})
    planned = [PlannedTensor("x", (4, 4), "F32", (Source("src", "x"),), "copy"),
               PlannedTensor("y", (4, 4), "F32", (Source("src", "x"),), "boom")]
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidArgument, match="already exists"):
        execute(_plan(path, planned), tmp_path / "taken")

    def boom(t, run):
        raise RuntimeError("kernel failed")
        yield

    monkeypatch.setitem(kernels.KERNELS, "boom", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        execute(_plan(path, planned), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors", "taken"]


def test_writer_shards_and_verify_written(tmp_path):
    from omgtool.formats.writer import ShardedSafetensorsWriter, verify_written
    from omgtool.plan.model import PlannedTensor

    tensors = {f"t{i}": torch.arange(i * 10, i * 10 + 100, dtype=torch.float32).view(10, 10) for i in range(5)}
    plan = [PlannedTensor(n, (10, 10), "F32") for n in tensors]
    writer = ShardedSafetensorsWriter(tmp_path, plan, 500, stem="model")  # one 400-byte tensor per shard
    for n, t in tensors.items():
        writer.write_rows(n, [t[:3], t[3:]])
    files = writer.close()
    assert files[-1] == "model.safetensors.index.json" and len(files) == 6
    index = json.loads((tmp_path / files[-1]).read_text())
    assert index["weight_map"] == {n: f"model-{i + 1:05d}-of-00005.safetensors" for i, n in enumerate(tensors)}
    assert index["metadata"]["total_size"] == 5 * 400
    for i, n in enumerate(tensors):
        assert torch.equal(load_file(str(tmp_path / files[i]))[n], tensors[n])
    assert verify_written(tmp_path, files, plan) == []
    wrong = plan[:-1] + [PlannedTensor("t4", (10, 10), "F16")]
    assert verify_written(tmp_path, files, wrong) == ["t4: written [10, 10] F32, planned [10, 10] F16"]


def test_writer_refuses_blocks_that_do_not_fit_the_plan(tmp_path):
    from omgtool.errors import OmgError
    from omgtool.formats.writer import ShardedSafetensorsWriter
    from omgtool.plan.model import PlannedTensor

    writer = ShardedSafetensorsWriter(tmp_path, [PlannedTensor("a", (4, 2), "F32")], 1 << 30)
    with pytest.raises(OmgError, match="blocks gave 3 rows, planned 4"):
        writer.write_rows("a", [torch.zeros(3, 2)])
    writer.abort()


# --- transforms, hashing, LoRA meaning, mapping schema -----------------------------------

def test_every_transform_plans_the_shapes_it_produces():
    from omgtool.kernels.transforms import SHAPES, TRANSFORMS, apply, transform_shapes

    params = {"num_heads": 6, "num_kv_heads": 2, "head_dim": 4}
    t = torch.randn((6 + 2 * 2) * 4, 7)
    assert set(SHAPES) == set(TRANSFORMS)
    for name in TRANSFORMS:
        assert transform_shapes(name, tuple(t.shape), params) == [tuple(p.shape) for p in apply(name, t, params)]


def test_hasher_digests_each_file(tmp_path):
    from omgtool.formats.hashing import BackgroundHasher, sha256_file

    blobs = {"a.bin": b"", "b.bin": b"x" * 1000, "c.bin": bytes(range(256)) * 4099}
    hasher = BackgroundHasher()
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        hasher.submit(name, tmp_path / name)
    results = hasher.finish()
    for name, data in blobs.items():
        assert results[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert sha256_file(tmp_path / name, block=4096) == hashlib.sha256(data).hexdigest()


def test_lora_scale_alpha_and_rank_patterns_as_peft_computes_them():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from omgtool.kernels.lora import AdapterSettings, module_scale

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 16)
            self.v_proj = torch.nn.Linear(16, 16)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True,
           "alpha_pattern": {"layers.1.q_proj": 2}, "rank_pattern": {"v_proj": 2}}
    model = get_peft_model(Net(), LoraConfig(**cfg))
    settings = AdapterSettings.from_config(cfg)
    seen = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            path = name.removeprefix("base_model.model.")
            rank = module.r["default"]
            assert rank == (2 if path.endswith("v_proj") else 4)
            _, scale = module_scale(path, cfg["lora_alpha"], rank, settings)
            assert scale == pytest.approx(module.scaling["default"]), path
            seen += 1
    assert seen == 4
    assert module_scale("layers.1.q_proj", 8, 4, settings, user_alpha=True)[1] == pytest.approx(8 / 2)


def _rslora_copy(src: Path, dst: Path) -> dict:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return cfg


def test_inspect_update_strength_uses_the_rslora_scale(tmp_path):
    """inspect --stats: each pair's scale and ||delta||_F equal PEFT's own LoRA layer's."""
    from peft import LoraConfig, get_peft_model

    cfg = _rslora_copy(ROOT / "fixtures" / "tiny" / "llava15" / "llava-v1.5-tiny-lora", tmp_path / "rs")
    report = json.loads(ok("inspect", tmp_path / "rs", "--stats", "--json").stdout)
    rows = report["update_strength"]
    assert rows and report["architecture"]["lora"]["scale"] == pytest.approx(cfg["lora_alpha"] / math.sqrt(cfg["r"]))
    weights = load_file(str(tmp_path / "rs" / "adapter_model.safetensors")) \
        if (tmp_path / "rs" / "adapter_model.safetensors").is_file() \
        else torch.load(tmp_path / "rs" / "adapter_model.bin", weights_only=True)
    for row in rows[:3]:
        a = next(v for k, v in weights.items() if row["weight"].removesuffix(".weight") + ".lora_A" in k)
        b = next(v for k, v in weights.items() if row["weight"].removesuffix(".weight") + ".lora_B" in k)
        layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(a.shape[1], b.shape[0], bias=False)),
                               LoraConfig(r=a.shape[0], lora_alpha=cfg["lora_alpha"], use_rslora=True,
                                          target_modules=["0"]))
        lora = layer.base_model.model[0]
        lora.lora_A["default"].weight.data.copy_(a.float())
        lora.lora_B["default"].weight.data.copy_(b.float())
        assert row["scale"] == pytest.approx(lora.scaling["default"])
        assert row["delta_fro"] == pytest.approx(float(lora.get_delta_weight("default").detach().double().norm()), rel=1e-5)


def test_verify_reference_uses_the_rslora_scale(tmp_path):
    """The unmerged reference of an rsLoRA adapter: PEFT's scale alpha/sqrt(r), and logits that
    equal the plain-torch InternLM2 oracle with that scale."""
    from omgtool.arch.infer import analyze
    from omgtool.formats import open_checkpoint
    from omgtool.verify.models.llm import Placement
    from omgtool.verify.models.reference import build_reference
    from tests.reference_internlm2 import internlm2_forward

    sd = torch.load(FINETUNE, map_location="cpu", weights_only=True)
    folder = tmp_path / "rs"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 256,
                                                            "use_rslora": True}))
    ad = open_checkpoint(folder)
    analysis = analyze(ad)
    assert analysis.family_name == "omg-llava"
    model, info, _ = build_reference(BASE, ad, analysis, torch.float32, Placement("cpu"))
    assert info.scale == pytest.approx(256 / math.sqrt(8))
    w = {}
    for f in sorted(BASE.glob("*.safetensors")):
        w.update(load_file(str(f)))
    pre = "llm.base_model.model."
    w["model.tok_embeddings.weight"] = sd[pre + "model.tok_embeddings.weight"]
    w["output.weight"] = sd[pre + "output.base_layer.weight"]
    lora = {k[len(pre):].split(".lora_A.")[0] + ".weight": (a, sd[k.replace("lora_A", "lora_B")], 256 / math.sqrt(8))
            for k, a in sd.items() if ".lora_A." in k}
    ids = torch.tensor([[1, 5, 9, 77, 320, 321]])
    cfg = json.loads((BASE / "config.json").read_text())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, internlm2_forward(w, cfg, ids, lora=lora), rtol=1e-4, atol=1e-4)


def test_mapping_schema_rejects_unknown_fields_and_reads_roles(tmp_path):
    import shutil

    from omgtool.arch.mapping import load_registry
    from omgtool.errors import InvalidArgument

    registry = load_registry()
    assert registry.architecture("internlm2").weight_with_role("embedding").name == "model.tok_embeddings.weight"
    assert registry.architecture("llama").weight_with_role("head").name == "lm_head.weight"
    omg = registry.family("omg-llava")
    assert omg.language_model.name == "llm" and [c.merge_target for c in omg.components] == \
        ["model", "projector.safetensors", "projector.safetensors"]
    for fam in registry.families.values():
        assert fam.language_model is not None, fam.name
    root = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", root)
    arch = root / "arch_llama.toml"
    arch.write_text(arch.read_text().replace('role = "head"', 'role = "lm-head"'))
    with pytest.raises(InvalidArgument, match="arch_llama.toml"):
        load_registry(root)
    arch.write_text(arch.read_text().replace('role = "lm-head"', 'optional = true'))
    with pytest.raises(InvalidArgument, match="arch_llama.toml"):
        load_registry(root)


def test_manifest_hash_is_one_sha256_per_file_and_diff_checks_each(tmp_path):
    from tests.paths import BASE as SHARDED

    manifest = tmp_path / "m.json"
    ok("inspect", SHARDED, "--manifest", manifest, "--hash", "--json")
    recorded = json.loads(manifest.read_text())
    shards = sorted(SHARDED.glob("*.safetensors"))
    assert len(shards) == 2 and "sha256" not in recorded and "per file" in recorded["sha256_of"]
    assert recorded["sha256_files"] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shards}
    report = json.loads(ok("diff", manifest, SHARDED, "--hash", "--json").stdout)
    assert report["hash"]["match"] is True and report["hash"]["expected"] == recorded["sha256_files"]
