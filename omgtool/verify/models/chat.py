"""The internlm2_chat prompt and a small tokenizer reader (no remote code, no fast tokenizer).

Tokenization: SentencePiece on `tokenizer.model`, with the added tokens of
`tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json` matched as whole
strings first (longest first), as HF tokenizers split on added tokens before the model
sees the text. `<image>` is not a token: it marks where the visual tokens are spliced
(xtuner's IMAGE_TOKEN_INDEX = -200).
"""

from __future__ import annotations

import re
from pathlib import Path

from omgtool.errors import UnreadableInput
from omgtool.formats.jsonfile import read_json_object
from omgtool.formats.tokenizer_files import added_tokens

TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200
SEG_TOKEN = "[SEG]"


def chat_prompt(user_input: str, answer: str = "") -> str:
    return TEMPLATE.format(input=user_input) + answer


class ChatTokenizer:
    def __init__(self, folder: str | Path):
        import sentencepiece as spm

        folder = Path(folder)
        model = folder / "tokenizer.model"
        if not model.is_file():
            raise UnreadableInput("no tokenizer.model (SentencePiece) in the folder", folder)
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        self.folder = folder
        config = read_json_object(folder / "tokenizer_config.json", missing_ok=True)
        self.add_bos = bool(config.get("add_bos_token", True))
        self.added: dict[str, int] = {}
        for idx, entry in added_tokens(folder).items():
            self.added.setdefault(entry["content"], idx)
        self.bos_id = self.sp.bos_id()
        if isinstance(config.get("bos_token"), str) and config["bos_token"] in self.added:
            self.bos_id = self.added[config["bos_token"]]
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    def __len__(self) -> int:
        return max([self.sp.get_piece_size() - 1, *self.added.values()]) + 1

    def token_id(self, text: str) -> int | None:
        if text in self.added:
            return self.added[text]
        idx = self.sp.piece_to_id(text)
        return None if idx == self.sp.unk_id() and text != self.sp.id_to_piece(idx) else idx

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids for `text`; `<image>` becomes IMAGE_TOKEN_INDEX (-200)."""
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id >= 0:
            ids.append(self.bos_id)
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self._encode_plain(chunk))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        parts = self._split.split(text) if self._split else [text]
        out: list[int] = []
        for part in parts:
            if not part:
                continue
            if part in self.added:
                out.append(self.added[part])
            else:
                out.extend(self.sp.encode(part))
        return out
