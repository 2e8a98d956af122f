"""Where the shipped tiny fixtures are (fixtures/tiny) and what the generator says it built."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny"
BASE = TINY / "internlm2-chat-tiny"
FINETUNE = TINY / "omg_llava_tiny_finetune.pth"
PRETRAIN = TINY / "omg_llava_tiny_pretrain.pth"
SPEC = json.loads((TINY / "spec.json").read_text())
