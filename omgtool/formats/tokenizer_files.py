"""Tokenizer folders: read their added tokens (`added_tokens`, `read_base_tokenizer`), and
register a family's added special tokens in a base model's tokenizer files, at the ids
training gave them, without loading any tokenizer code (InternLM2's is remote code).

The family mapping lists the tokens in the order training added them (`[tokens]` in
`mappings/family_*.toml`): with a base tokenizer of V tokens they get ids V, V+1, ...
Tokens marked `embedded = false` were added after the embedding resize, so their ids lie
past the last embedding row (OMG-LLaVA's `<mark>`: id V+4 with V+4 rows).

Written as plain JSON: `tokenizer_config.json` (added_tokens_decoder,
additional_special_tokens), `special_tokens_map.json` (additional_special_tokens),
`added_tokens.json` (older loaders read it) and, when the base has one, `tokenizer.json`
(added_tokens). `tokenizer.model` (SentencePiece) is carried unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omgtool.errors import MismatchError, UnreadableInput
from omgtool.formats.jsonfile import read_json_object
from omgtool.formats.writer import write_json

if TYPE_CHECKING:  # the family mapping's [tokens] table; formats import nothing from arch at run time
    from omgtool.arch.mapping import TokensSpec

#: Files this module rewrites when tokens are registered (the rest of the base is carried).
WRITTEN_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


@dataclass(frozen=True)
class PlannedToken:
    content: str
    id: int
    embedded: bool
    description: str = ""


@dataclass
class BaseTokenizer:
    """What the base folder's tokenizer files say: its size and the tokens it already has."""

    folder: Path
    size: int | None  # V: number of ids (None: no tokenizer files)
    known: dict[str, int] = field(default_factory=dict)  # content -> id, for special/added tokens
    sources: list[str] = field(default_factory=list)  # which files gave the size


@dataclass
class TokenPlan:
    base: BaseTokenizer
    tokens: list[PlannedToken]
    embedding_rows: int | None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        """The tokenizer files this plan writes (the base's, plus the three always written)."""
        if not self.tokens:
            return []
        out = ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
        if (self.base.folder / "tokenizer.json").is_file():
            out.append("tokenizer.json")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"base_size": self.base.size, "base_size_from": self.base.sources,
                "embedding_rows": self.embedding_rows,
                "added": [{"content": t.content, "id": t.id, "embedded": t.embedded} for t in self.tokens],
                "source": self.source, "files": self.files, "notes": self.notes}


def added_tokens(folder: Path) -> dict[int, dict[str, Any]]:
    """id -> AddedToken fields, from tokenizer_config.json added_tokens_decoder and (older
    folders) added_tokens.json. The one reader of a folder's added tokens."""
    folder = Path(folder)
    cfg = read_json_object(folder / "tokenizer_config.json", missing_ok=True)
    out: dict[int, dict[str, Any]] = {}
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise UnreadableInput("tokenizer_config.json added_tokens_decoder is not an object", folder)
    for key, entry in decoder.items():
        try:
            idx = int(key)
        except ValueError:
            raise UnreadableInput(f"tokenizer_config.json added_tokens_decoder has a non-integer id {key!r}",
                                  folder) from None
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            out[idx] = dict(entry)
        elif isinstance(entry, str):
            out[idx] = {"content": entry, "special": True}
    for content, idx in read_json_object(folder / "added_tokens.json", missing_ok=True).items():
        try:
            out.setdefault(int(idx), {"content": content, "special": True})
        except (TypeError, ValueError):
            raise UnreadableInput(f"added_tokens.json maps {content!r} to a non-integer id", folder) from None
    return out


def read_base_tokenizer(folder: Path) -> BaseTokenizer:
    """V and the known added/special tokens, from tokenizer.model (SentencePiece pieces),
    tokenizer.json, tokenizer_config.json added_tokens_decoder and added_tokens.json."""
    folder = Path(folder)
    ids: list[int] = []
    known: dict[str, int] = {}
    sources: list[str] = []
    if (folder / "tokenizer.model").is_file():
        from omgtool.formats.sentencepiece import read_spm

        spm = read_spm(folder / "tokenizer.model")
        ids.append(len(spm.pieces) - 1)
        sources.append(f"tokenizer.model ({len(spm.pieces)} pieces)")
        for i, (piece, _, typ) in enumerate(spm.pieces):
            if typ != 1:  # not NORMAL: control, user-defined, unknown, byte, unused
                known.setdefault(piece, i)
    if (folder / "tokenizer.json").is_file():
        tj = read_json_object(folder / "tokenizer.json")
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and vocab:
            ids.append(max(int(v) for v in vocab.values()))
            sources.append(f"tokenizer.json ({len(vocab)} vocab entries)")
        for entry in tj.get("added_tokens") or []:
            if isinstance(entry, dict) and "id" in entry and "content" in entry:
                ids.append(int(entry["id"]))
                known.setdefault(entry["content"], int(entry["id"]))
    added = added_tokens(folder)
    for idx, entry in added.items():
        ids.append(idx)
        known.setdefault(entry["content"], idx)
    if added:
        sources.append("tokenizer_config.json added_tokens_decoder / added_tokens.json")
    size = max(ids) + 1 if ids else None
    return BaseTokenizer(folder, size, known, sources)


def plan_tokens(spec: TokensSpec | None, base_folder: Path, embedding_rows: int | None,
                embedding_tensor: str = "the embedding table") -> TokenPlan:
    """Ids for the family's tokens, checked against the output's embedding rows.

    The embedded tokens must fill exactly the rows past the base tokenizer (V + n rows), as
    training's resize_token_embeddings(len(tokenizer)) made them; anything else means the base
    and the checkpoint do not belong together (MismatchError naming the tensor).
    """
    base = read_base_tokenizer(base_folder)
    if spec is None or not spec.added:
        plan = TokenPlan(base, [], embedding_rows)
        if embedding_rows is not None and base.size is not None and embedding_rows > base.size:
            plan.notes.append(f"{embedding_rows - base.size} embedding rows past the base tokenizer's {base.size} "
                              "tokens; the family mapping names no added tokens, so the tokenizer is unchanged")
        return plan
    if base.size is None:
        raise UnreadableInput("the base folder has no tokenizer files (tokenizer.model, tokenizer.json or "
                              "tokenizer_config.json): cannot place the added tokens", base_folder)
    clash = [f"{t.content} (id {base.known[t.content]})" for t in spec.added if t.content in base.known]
    if clash:
        raise MismatchError(f"{base_folder}: the base tokenizer already has {', '.join(clash)}; is --base "
                            "already a merged model? Pass the original base")
    tokens = [PlannedToken(t.content, base.size + i, t.embedded, t.description) for i, t in enumerate(spec.added)]
    n_embedded = sum(t.embedded for t in tokens)
    if embedding_rows is not None and embedding_rows != base.size + n_embedded:
        raise MismatchError(f"{embedding_tensor} has {embedding_rows} rows but the base tokenizer has "
                            f"{base.size} tokens ({', '.join(base.sources)}) and the family adds {n_embedded} "
                            f"embedded tokens ({', '.join(t.content for t in tokens if t.embedded)}): expected "
                            f"{base.size + n_embedded}; the base does not match the checkpoint")
    plan = TokenPlan(base, tokens, embedding_rows, spec.source)
    for t in tokens:
        if not t.embedded:
            plan.notes.append(f"{t.content} has id {t.id}, past the {embedding_rows or base.size + n_embedded} "
                              "embedding rows (as in training): it is never embedded")
    return plan


def _entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_tokenizer_files(plan: TokenPlan, dst: Path) -> list[str]:
    """Write the tokenizer files that change into `dst` (the base's values kept, tokens added)."""
    if not plan.tokens:
        return []
    src = plan.base.folder
    names = [t.content for t in plan.tokens]

    cfg = read_json_object(src / "tokenizer_config.json", missing_ok=True)
    decoder = dict(cfg.get("added_tokens_decoder") or {})
    for t in plan.tokens:
        decoder[str(t.id)] = _entry(t.content)
    cfg["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    cfg["additional_special_tokens"] = _extend(cfg.get("additional_special_tokens"), names)
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["extra_special_tokens"] = _extend(cfg["extra_special_tokens"], names)
    write_json(dst / "tokenizer_config.json", cfg)

    smap = read_json_object(src / "special_tokens_map.json", missing_ok=True)
    smap["additional_special_tokens"] = _extend(smap.get("additional_special_tokens"), names)
    write_json(dst / "special_tokens_map.json", smap)

    added = read_json_object(src / "added_tokens.json", missing_ok=True)
    added.update({t.content: t.id for t in plan.tokens})
    write_json(dst / "added_tokens.json", dict(sorted(added.items(), key=lambda kv: kv[1])))

    written = ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
    if (src / "tokenizer.json").is_file():
        tj = read_json_object(src / "tokenizer.json")
        entries = list(tj.get("added_tokens") or [])
        for t in plan.tokens:
            entries.append({"id": t.id, **{k: v for k, v in _entry(t.content).items()}})
        tj["added_tokens"] = sorted(entries, key=lambda e: int(e["id"]))
        write_json(dst / "tokenizer.json", tj)
        _check_fast(dst / "tokenizer.json", plan)
        written.append("tokenizer.json")
    return written


def _extend(existing, names: list[str]) -> list:
    """An additional_special_tokens list with `names` appended (same form as the entries)."""
    items = list(existing or [])
    have = {e.get("content") if isinstance(e, dict) else e for e in items}
    as_dict = bool(items) and all(isinstance(e, dict) for e in items)
    for n in names:
        if n not in have:
            items.append({k: v for k, v in _entry(n).items() if k != "special"} if as_dict else n)
    return items


def _check_fast(path: Path, plan: TokenPlan) -> None:
    """The written tokenizer.json must give every token its planned id (tokenizers assigns
    added-token ids itself when loading)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(path))
    for t in plan.tokens:
        got = tk.token_to_id(t.content)
        if got != t.id:
            raise MismatchError(f"tokenizer.json would give {t.content} id {got}, not {t.id} (the base "
                                "tokenizer.json's ids are not contiguous)")


def readme_section(plan: TokenPlan) -> str:
    """Markdown explaining the added tokens, for the README written into the output."""
    if not plan.tokens:
        return ""
    rows = plan.embedding_rows
    lines = ["## Added special tokens", "",
             f"The base tokenizer has {plan.base.size} tokens (ids 0..{plan.base.size - 1}). Training added "
             f"these special tokens, registered here at the ids training used:", "",
             "| token | id | embedding row | meaning |", "|---|---:|---|---|"]
    for t in plan.tokens:
        row = "yes" if t.embedded else "**none**"
        lines.append(f"| `{t.content}` | {t.id} | {row} | {t.description} |")
    unembedded = [t for t in plan.tokens if not t.embedded]
    lines.append("")
    if unembedded:
        names = ", ".join(f"`{t.content}` (id {t.id})" for t in unembedded)
        lines += [
            f"The embedding table and the output head have {rows} rows, so the tokenizer holds "
            f"{plan.base.size + len(plan.tokens)} tokens while the model has {rows} embeddings: {names} "
            "was added after the embeddings were resized and is never embedded. The multimodal model replaces "
            "it with prompt features before the language model sees it. Do not resize the embeddings to "
            "`len(tokenizer)` and do not drop the token: `config.json` keeps `vocab_size` = "
            f"{rows}, the number of rows.", ""]
    if plan.source:
        lines += [f"Source: {plan.source}.", ""]
    return "\n".join(lines)
