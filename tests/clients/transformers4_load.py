"""Run under transformers 4.x (a side install put first on PYTHONPATH): load a `--to llama`
export and write what 4.x made of it. Usage: python -m tests.clients.transformers4_load JOB.json

JOB.json: {"model": folder, "tokenizers": [folders], "configs": [folders], "out": folder}.
out/input_ids.pt and out/prompts.json are the inputs; out/logits.pt (float32) and
out/result.json (version, the rope settings of every config as 4.x reads them, tokenizer
classes and ids) the outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.load(out / "input_ids.pt")).logits
    torch.save(logits, out / "logits.pt")
    prompts = json.loads((out / "prompts.json").read_text())
    tokenizers = {}
    for folder in job["tokenizers"]:
        tok = AutoTokenizer.from_pretrained(folder)
        tokenizers[folder] = {"class": type(tok).__name__, "bos": tok("hi").input_ids[0],
                              "ids": [tok.encode(p, add_special_tokens=False) for p in prompts]}
    configs = {}
    for folder in job["configs"]:
        config = AutoConfig.from_pretrained(folder)
        configs[folder] = {"rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling}
    result = {"transformers": transformers.__version__, "model_class": type(model).__name__,
              "tokenizers": tokenizers, "configs": configs}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
