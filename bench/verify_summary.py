"""Summarise `omgtool verify --json` reports (and bench/gpu_e2e.sh step timings) as markdown.

    .venv/bin/python -m bench.verify_summary RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _gb(n) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB"


def summarize(folder: Path) -> str:
    lines = ["| step | wall s | exit |", "|---|---:|---:|"]
    for f in sorted(folder.glob("*.time")):
        t = json.loads(f.read_text())
        lines.append(f"| {t['step']} | {float(t['wall_s']):.1f} | {t['rc']} |")
    for f in sorted(folder.glob("verify_*.json")):
        if not f.read_text().strip():
            continue
        r = json.loads(f.read_text())
        m, t = r["memory"], r["timings_s"]
        lines += ["", f"### {f.stem}: {'PASS' if r['passed'] else 'FAIL ' + ', '.join(r['failed'])}", "",
                  f"device {r['device']} · {r['layout']} · compute {r['precision']['compute']} "
                  f"({r['precision']['why']}) · stored {r['precision']['stored']} · placement {r['placement']}",
                  "", "| timing | s |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in t.items()]
        ratio = m.get("peak_gpu_over_bf16_weights")
        lines += ["", f"peak GPU allocated {_gb(m.get('peak_gpu_allocated_bytes'))} "
                  f"(reserved {_gb(m.get('peak_gpu_reserved_bytes'))}"
                  + (f"; {ratio}x the bf16 LLM weights" if ratio else "")
                  + f"); bf16 LLM weights {_gb(r['llm'].get('bf16_weight_bytes'))}; "
                  f"peak CPU RSS {_gb(m.get('peak_cpu_rss_bytes'))}", ""]
        lines += ["| check | status | numbers |", "|---|---|---|"]
        for name, c in r["checks"].items():
            if name == "merge" and "delta" in c:
                d, fl = c["delta"], c.get("floor", {})
                nums = (f"Δ max {d['max_abs']:.4g}, mean {d['mean_abs']:.4g}, relL2 {d['rel_l2']:.4g}, top-1 "
                        f"{d['top1_agreement']:.1%}; floor relL2 {fl.get('rel_l2', 0):.4g} ({fl.get('kind', '')}); "
                        f"tolerance {c['tolerance_rel_l2']:.4g}; LoRA effect relL2 "
                        f"{c.get('lora_effect', {}).get('rel_l2', float('nan')):.4g}; alpha {c['reference']['alpha']}")
            elif name == "multimodal" and "visual_tokens" in c:
                v = c["visual_tokens"]
                nums = (f"trunk {c['trunk_last_stage']} → {c['pixel_shuffled']} → {v['grid']}+1+{v['queries']} "
                        f"tokens, sequence {c['sequence']['total']}")
            elif name == "seg" and "vector_shape" in c:
                nums = f"[SEG] → {c['vector_shape']}"
            elif name == "llm_forward" and "logits" in c:
                nums = f"logits {c['logits']['shape']}, finite {c['logits']['finite']}"
            else:
                nums = c.get("reason", "")
            lines.append(f"| {name} | {c['status']} | {nums} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/verify")))
