"""Where the tensors sit in a walked pickle: at any depth of dicts, lists and tuples.

`find_tensors` lists every tensor with its dotted path (`model_state_dict.conv.weight`),
picks the dict that holds the model (a chain of known wrapper keys, else the dict with
the most tensors), names the model's tensors relative to it (what family inference
matches), and puts tensors outside it in their own groups (optimizer, scheduler, extra).
A bare tensor saved with `torch.save` is one tensor.

The traversal is iterative with a depth cap, and visits each container once (pickles can
share and even cycle references), so no input can overflow the stack or loop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from omgtool.formats.base import printable_name
from omgtool.formats.pickle_walker import IdentitySet, TensorRef

# Keys training code wraps a model's state dict under (DeepSpeed, Lightning, timm, ...).
MODEL_WRAPPERS = ("state_dict", "module", "model", "model_state", "model_state_dict", "model_states",
                  "net", "network", "params", "weights")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state", "optimizer_state_dict", "optimizer_states", "optim",
                  "optim_state", "opt", "optimizer_states_dict")
SCHEDULER_KEYS = ("lr_scheduler", "scheduler", "scheduler_state", "scheduler_state_dict",
                  "lr_scheduler_state_dict", "lr_schedulers")
BARE_TENSOR_NAME = "tensor"
MAX_DEPTH = 256
SUMMARY_ITEMS = 200  # per container
SUMMARY_DEPTH = 8
SUMMARY_BUDGET = 5000  # nodes in the whole metadata summary

GROUP_DESCRIPTIONS = {
    "optimizer": "optimizer state (moments, steps) saved beside the model",
    "scheduler": "learning-rate scheduler state saved beside the model",
    "extra": "tensors outside the model's state dict (EMA copies, buffers, other saved objects)",
}


class TooDeep(Exception):
    pass


@dataclass
class Layout:
    tensors: dict[str, TensorRef]  # display name -> ref, model tensors first
    groups: dict[str, str] = field(default_factory=dict)  # name -> group, for tensors outside the model
    container: str | None = None  # dotted path of the model dict ("module", "model.state_dict")
    metadata: dict[str, Any] = field(default_factory=dict)
    bare: bool = False


def _children(obj: Any):
    if isinstance(obj, dict):
        return ((printable_name(str(k)), v) for k, v in obj.items())
    return ((str(i), v) for i, v in enumerate(obj))


def _raw_children(obj: Any):
    """(raw key, value) pairs; the display key (`_display_key`) is built only where it is needed."""
    return obj.items() if isinstance(obj, dict) else enumerate(obj)


def _display_key(obj: Any, raw: Any) -> str:
    return printable_name(str(raw)) if isinstance(obj, dict) else str(raw)


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (dict, list, tuple))


def walk_tensors(root: Any) -> tuple[list[tuple[tuple[str, ...], TensorRef]], dict[tuple[str, ...], int]]:
    """Every tensor with its path, in pickle order; and per dict holding tensors directly (by path)
    its direct tensor count.

    Depth-first with one iterator per open container, so the memory is the depth, not the
    width: a list of a million scalars costs no object per value. Each container is expanded
    once (`IdentitySet`: a bitmap, not a set of ids)."""
    found: list[tuple[tuple[str, ...], TensorRef]] = []
    dicts: dict[tuple[str, ...], int] = {}
    if isinstance(root, TensorRef):
        return [((), root)], dicts
    seen = IdentitySet()
    stack: list[tuple[Any, tuple[str, ...], Any]] = []

    def expand(obj: Any, path: tuple[str, ...]) -> None:
        if not _is_container(obj) or seen.add(obj):
            return
        if len(path) >= MAX_DEPTH:
            raise TooDeep(f"containers nested deeper than {MAX_DEPTH} levels")
        if not obj:
            return
        if isinstance(obj, dict):
            count = sum(isinstance(v, TensorRef) for v in obj.values())
            if count:
                dicts[path] = count
        stack.append((obj, path, iter(_raw_children(obj))))

    expand(root, ())
    while stack:
        obj, path, kids = stack[-1]
        for raw, value in kids:
            if isinstance(value, TensorRef):
                found.append(((*path, _display_key(obj, raw)), value))
            elif _is_container(value):
                expand(value, (*path, _display_key(obj, raw)))
                if stack[-1][2] is not kids:
                    break  # descend into it; this container's iterator resumes after
        else:
            stack.pop()
    return found, dicts


def _lookup(root: Any, path: tuple[str, ...]) -> Any:
    obj = root
    for key in path:
        if not _is_container(obj):
            return None
        match = None
        for name, value in _children(obj):  # the last of equal display names, as dict() keeps it
            if name == key:
                match = value
        obj = match
    return obj


def _side_group(path: tuple[str, ...]) -> str:
    for key in path:
        low = key.lower()
        if low in OPTIMIZER_KEYS:
            return "optimizer"
        if low in SCHEDULER_KEYS:
            return "scheduler"
    return "extra"


def _model_path(root: Any, found, dicts: dict[tuple[str, ...], int]) -> tuple[str, ...] | None:
    """A chain of known wrapper keys from the top (model -> state_dict) that leads to tensors;
    else the dict holding the most tensors directly (the shallowest on a tie), outside
    optimizer and scheduler states."""
    if not isinstance(root, dict):
        return None
    paths = [p for p, _ in found]
    chain: tuple[str, ...] = ()
    node: Any = root
    while isinstance(node, dict):
        for key in MODEL_WRAPPERS:
            inner = node.get(key)
            prefix = (*chain, key)
            if isinstance(inner, dict) and any(p[:len(prefix)] == prefix for p in paths):
                chain, node = prefix, inner
                break
        else:
            break
    if chain:
        return chain
    best, best_count = None, 0
    for prefix, count in dicts.items():
        if _side_group(prefix) != "extra" or count == 0:
            continue
        if count > best_count or (count == best_count and len(prefix) < len(best)):
            best, best_count = prefix, count
    model_side = sum(1 for p in paths if _side_group(p) == "extra")
    if best is not None and 2 * best_count < model_side:
        return ()  # no dict holds most of the tensors: name them all from the top
    return best


def find_tensors(root: Any) -> Layout:
    if isinstance(root, TensorRef):
        return Layout({BARE_TENSOR_NAME: root}, bare=True, metadata={"saved_object": "a bare tensor"})
    found, dicts = walk_tensors(root)
    model = _model_path(root, found, dicts)
    tensors: dict[str, TensorRef] = {}
    groups: dict[str, str] = {}
    outside: list[tuple[tuple[str, ...], TensorRef]] = []
    for path, ref in found:
        inside = model is not None and path[:len(model)] == model and len(path) > len(model)
        if inside and _side_group(path[len(model):]) == "extra":
            tensors[_unique(".".join(path[len(model):]), tensors)] = ref
        else:
            outside.append((path, ref))
    for path, ref in outside:
        name = _unique(".".join(path), tensors)
        tensors[name] = ref
        groups[name] = _side_group(path)
    container = ".".join(model) if model else None  # () and None: the top level
    return Layout(tensors, groups, container or None, _metadata(root, model))


def _unique(name: str, taken: dict) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}#{k}" in taken:
        k += 1
    return f"{name}#{k}"


def _metadata(root: Any, model: tuple[str, ...] | None) -> dict[str, Any]:
    """A bounded JSON-friendly view of everything that is not a model tensor."""
    model_obj = _lookup(root, model) if model else None
    budget = [SUMMARY_BUDGET]
    if isinstance(root, dict):
        if model_obj is root:
            items = ((k, v) for k, v in _children(root) if not isinstance(v, TensorRef))
        else:
            items = ((k, v) for k, v in _children(root) if v is not model_obj)
        return {k: summarize(v, model_obj, budget) for k, v in itertools.islice(items, SUMMARY_ITEMS)}
    if root is None:
        return {}
    return {"saved_object": summarize(root, model_obj, budget)}


def summarize(value: Any, model_obj: Any = None, budget: list[int] | None = None, depth: int = 0) -> Any:
    budget = budget if budget is not None else [SUMMARY_BUDGET]
    budget[0] -= 1
    if isinstance(value, str):
        return printable_name(value[:200])
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if abs(value) < 1 << 63 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, TensorRef):
        return f"<tensor {list(value.shape)[:8]} {value.storage.dtype}>"
    if value is model_obj and value is not None:
        return f"<state dict: {len(value)} entries>"
    if _is_container(value):
        if depth >= SUMMARY_DEPTH or budget[0] <= 0:
            return f"<{type(value).__name__} of {len(value)}>"
        kids = []
        for key, item in _children(value):
            if len(kids) >= SUMMARY_ITEMS or budget[0] <= 0:
                break
            kids.append((key, summarize(item, model_obj, budget, depth + 1)))
        return dict(kids) if isinstance(value, dict) else [v for _, v in kids]
    return printable_name(_short_repr(value))


def _short_repr(value: Any) -> str:
    try:
        if isinstance(value, (bytes, bytearray)):
            return repr(bytes(value[:100]))
        if isinstance(value, (set, frozenset)):
            return f"<{type(value).__name__} of {len(value)}>"
        return repr(value)[:200]
    except Exception:  # a stand-in whose repr fails: say what it is
        return f"<{type(value).__name__}>"
