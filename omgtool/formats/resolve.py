"""Find a base model folder from what a user types: a path, `internlm2-chat-7b` or
`internlm/internlm2-chat-7b`.

Order: the text as a path; a folder of that name (or its last part) in the current
directory, then beside the checkpoint; then the local HuggingFace hub cache, read
offline through its layout (`models--<org>--<name>/refs/<revision>` ->
`snapshots/<commit>/`). Nothing is ever downloaded. The error lists every place looked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omgtool.errors import InvalidArgument


@dataclass
class ResolvedBase:
    path: Path
    how: str  # "path", "current directory", "beside the checkpoint", "HuggingFace cache"
    requested: str
    repo_id: str | None = None  # for a cache hit
    revision: str | None = None  # the snapshot's commit
    looked: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {"requested": self.requested, "path": str(self.path), "resolved_by": self.how}
        if self.repo_id:
            out.update(repo_id=self.repo_id, revision=self.revision)
        return out


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def _looks_like_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def resolve_base(text: str | Path, checkpoint: str | Path | None = None, *, cwd: Path | None = None,
                 cache_dir: Path | None = None, revision: str = "main") -> ResolvedBase:
    """The base model folder `text` names. Raises InvalidArgument listing where it looked."""
    requested = str(text)
    looked: list[str] = []
    cwd = Path(cwd) if cwd is not None else Path.cwd()

    direct = Path(os.path.expanduser(requested))
    if not direct.is_absolute():
        direct = cwd / direct
    looked.append(str(direct))
    if direct.is_dir():
        return ResolvedBase(direct, "path", requested, looked=looked)
    if direct.exists():
        raise InvalidArgument(f"--base {requested}: {direct} is a file; --base needs a model folder "
                              "(config.json + weights) or a model name")

    name = requested.rstrip("/")
    parts = [p for p in name.split("/") if p]
    is_name = 1 <= len(parts) <= 2 and not Path(requested).is_absolute() and not requested.startswith(".")
    if is_name:
        short = parts[-1]
        places = [("current directory", cwd)]
        if checkpoint is not None:
            places.append(("beside the checkpoint", Path(checkpoint).resolve().parent))
        for how, root in places:
            for cand in dict.fromkeys([root / name, root / short]):
                looked.append(str(cand))
                if cand.is_dir() and _looks_like_model(cand):
                    return ResolvedBase(cand, how, requested, looked=looked)
        hit = _from_hub_cache(parts, Path(cache_dir) if cache_dir else hub_cache_dir(), revision, looked)
        if hit is not None:
            path, repo_id, commit = hit
            return ResolvedBase(path, "HuggingFace cache", requested, repo_id=repo_id, revision=commit,
                                looked=looked)
    hint = ""
    if is_name:
        repo = name if len(parts) == 2 else f"<org>/{parts[-1]}"
        hint = (f"; download it first (e.g. `hf download {repo} --local-dir {repo.rsplit('/', 1)[-1]}`) "
                "or pass the folder")
    raise InvalidArgument(f"--base {requested}: no model folder found; looked at "
                          f"{', '.join(dict.fromkeys(looked))}{hint}")


def _from_hub_cache(parts: list[str], cache: Path, revision: str, looked: list[str]):
    """(snapshot folder, repo id, commit) from the hub cache, or None. Offline: reads the layout."""
    if not cache.is_dir():
        looked.append(f"HuggingFace cache {cache} (does not exist)")
        return None
    if len(parts) == 2:
        repos = [(f"{parts[0]}/{parts[1]}", cache / f"models--{parts[0]}--{parts[1]}")]
    else:  # a bare name: any organisation's repo of that name
        suffix = f"--{parts[0]}"
        repos = [(d.name[len("models--"):].replace("--", "/", 1), d) for d in sorted(cache.glob("models--*"))
                 if d.name.endswith(suffix) and d.name.count("--") == 2]
    if not repos:
        looked.append(f"HuggingFace cache {cache} (no models--*--{parts[-1]})" if len(parts) == 1
                      else f"HuggingFace cache {cache / f'models--{parts[0]}--{parts[1]}'}")
        return None
    found = []
    for repo_id, repo_dir in repos:
        snap = _snapshot(repo_id, repo_dir, cache, revision)
        looked.append(f"HuggingFace cache {repo_dir}" + ("" if snap else " (no complete snapshot)"))
        if snap is not None:
            found.append((snap[0], repo_id, snap[1]))
    if len(found) > 1:
        raise InvalidArgument(f"--base {'/'.join(parts)} is ambiguous in the HuggingFace cache: "
                              f"{', '.join(r for _, r, _ in found)}; pass ORG/NAME or the folder")
    return found[0] if found else None


def _snapshot(repo_id: str, repo_dir: Path, cache: Path, revision: str):
    """The snapshot folder for `revision` (via huggingface_hub's own offline cache lookup),
    else the newest snapshot holding a config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache), revision=revision)
    except Exception:  # an odd cache layout: fall back to reading the folders
        got = None
    if isinstance(got, str) and Path(got).is_file():
        folder = Path(got).parent
        return folder, folder.name
    snaps = [s for s in (repo_dir / "snapshots").glob("*") if _looks_like_model(s)]
    if not snaps:
        return None
    newest = max(snaps, key=lambda s: s.stat().st_mtime)
    return newest, newest.name
