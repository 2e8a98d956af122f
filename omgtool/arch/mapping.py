"""Mappings: architectures, families and conversions declared as data in `mappings/*.toml`.

An *architecture* lists weight-name templates (`model.layers.{layer}.attention.wqkv.weight`)
with their group, the meaning of each shape dimension, and whether LoRA may target it.
A *family* composes architectures under key prefixes (`llm.`, `projector.`) and says
how LoRA alpha is found and how stages are told apart. A *conversion* lists rename and
split rules from one architecture to another.

`match_keys` assigns every key of a checkpoint to a component and role, seeing through
PEFT wrappers (`base_model.model.`, `.base_layer.`, `.lora_A.<adapter>.`). Templates are
matched whole (`{layer}` = 1-9 digits): no substring tests.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from omgtool.arch import mapping_cache
from omgtool.errors import InvalidArgument
from omgtool.mappings_dir import mappings_dir  # noqa: F401  (re-exported)


# The schemas are plain frozen dataclasses: pydantic validates the TOML into them (unknown keys
# refused, types and Literals checked, __post_init__ checks run) only when a mapping file is new
# or edited; a start-up over validated files rebuilds them from mapping_cache without importing
# pydantic at all.
SCHEMAS: dict[str, type] = {}  # every schema class by name (mapping_cache rebuilds them by it)


def schema(cls):
    cls.__pydantic_config__ = {"extra": "forbid"}  # pydantic refuses unknown keys
    SCHEMAS[cls.__name__] = cls = dataclass(frozen=True, kw_only=True)(cls)
    return cls


class _Invalid(ValueError):
    pass


def _validate(cls: type, data: dict) -> Any:
    """`data` (a parsed TOML file) as `cls`, checked by pydantic; _Invalid says what is wrong."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise _Invalid(str(exc)) from None


@schema
class WeightSpec:
    name: str  # template; `{layer}` stands for the layer index
    group: str
    dims: list[str] = field(default_factory=list)  # meaning of each shape dim; "_" = don't care
    lora_target: bool = False
    # what the weight is to the tools: "embedding" (token table) or "head" (output projection);
    # exports and verify find these by role, never by name
    role: Literal["embedding", "head"] | None = None


@schema
class ArchitectureMapping:
    kind: Literal["architecture"]
    name: str
    description: str
    groups: dict[str, str] = field(default_factory=dict)  # group -> what it is for
    defaults: dict[str, Any] = field(default_factory=dict)  # assumptions, each with a *_source
    derive: list[str] = field(default_factory=list)  # named derivations in omgtool.arch.infer
    layer_count_key: str | None = None  # config.json key for the layer count
    # how an HF config.json names this architecture (model_type, architectures)
    model_types: list[str] = field(default_factory=list)
    hf_architectures: list[str] = field(default_factory=list)
    weights: list[WeightSpec]

    def weight_with_role(self, role: str) -> WeightSpec | None:
        return next((w for w in self.weights if w.role == role), None)

    def __post_init__(self):
        names = [w.name for w in self.weights]
        if len(set(names)) != len(names):
            raise ValueError("duplicate weight templates")
        for w in self.weights:
            if w.group not in self.groups:
                raise ValueError(f"weight {w.name} names undeclared group {w.group!r}")


@schema
class ComponentSpec:
    name: str
    architecture: str
    prefixes: list[str]  # tried longest first
    required: bool = False
    # the family's language model (what LoRA exports and verify work on)
    language_model: bool = False
    # merge-lora: where this component's tensors go. "model": into the merged base model (its
    # weight names are the base's key names); a file name: carried there under the original
    # key names. None: "model" for the language model, else "projector.safetensors".
    merge_into: str | None = None
    # merge-lora, for a component merged into the model: the prefix its weight names carry in
    # the base's key names (ColLlavaI's Qwen2 sits under "language_model."; "" = as is).
    base_prefix: str = ""
    # merge-lora: the base model may lack this whole component (LLaVA-1.5's mm_projector on a
    # Vicuna base); its full tensors are then added to the merged model under their names.
    added_to_base: bool = False

    @property
    def merge_target(self) -> str:
        if self.merge_into is not None:
            return self.merge_into
        return "model" if self.language_model else "projector.safetensors"


@schema
class LoraSpec:
    alpha_from: Literal["mapping", "adapter_config"] = "mapping"
    default_alpha: float | None = None
    alpha_source: str = ""
    adapter_names: list[str] = field(default_factory=lambda: ["default"])
    # detect this family only when an adapter_config.json was read; None: when alpha_from is
    # "adapter_config" (a generic PEFT family must not claim bare state dicts)
    require_adapter_config: bool | None = None

    @property
    def needs_adapter_config(self) -> bool:
        if self.require_adapter_config is None:
            return self.alpha_from == "adapter_config"
        return self.require_adapter_config


@schema
class StageSpec:
    name: str
    when: Literal["lora", "no-lora", "always"]
    description: str = ""
    present: list[str] = field(default_factory=list)  # components that must have keys
    absent: list[str] = field(default_factory=list)  # components that must have none


@schema
class TokenSpec:
    content: str
    embedded: bool = True  # False: added after the embedding resize, so its id has no row
    description: str = ""


@schema
class TokensSpec:
    """Special tokens training added to the base tokenizer, in order: ids V, V+1, ... (V = base size)."""

    added: list[TokenSpec]
    source: str = ""

    def __post_init__(self):
        names = [t.content for t in self.added]
        if len(set(names)) != len(names):
            raise ValueError("a token is listed twice")
        embedded = [t.embedded for t in self.added]
        if embedded != sorted(embedded, reverse=True):
            raise ValueError("tokens without an embedding row must come after the embedded ones")


@schema
class QloraSpec:
    """How training held the frozen base: bitsandbytes 4-bit, each setting with its source
    (merge-lora --base-weights nf4-dequant, verify --reference nf4; see omgtool.arch.qlora)."""

    component: str = "llm"
    stages: list[str]  # the stages trained on the 4-bit base
    source: str = ""
    quant_type: Literal["nf4", "fp4"]
    quant_type_source: str
    blocksize: int
    blocksize_source: str
    double_quant: bool
    double_quant_source: str
    load_dtype: Literal["fp16", "bf16", "fp32"]
    load_dtype_source: str
    compute_dtype: Literal["fp16", "bf16", "fp32"]
    compute_dtype_source: str
    quantized: list[str]  # weight templates of the component held in 4-bit
    quantized_source: str
    skipped: list[str] = field(default_factory=list)  # linears training kept in full precision
    skipped_source: str = ""


@schema
class FamilyMapping:
    kind: Literal["family"]
    name: str
    description: str
    priority: int = 0  # tie-break when two families explain the same keys
    components: list[ComponentSpec]
    lora: LoraSpec | None = None
    stages: list[StageSpec] = field(default_factory=lambda: [StageSpec(name="full", when="always")])
    tokens: TokensSpec | None = None
    qlora: QloraSpec | None = None
    # merge-lora: the output config.json is the base's, or the checkpoint folder's own
    # config.json when it has one (a LLaVA LoRA run keeps the LlavaConfig it was built with).
    merge_config: Literal["base", "checkpoint"] = "base"

    @property
    def language_models(self) -> list[ComponentSpec]:
        return [c for c in self.components if c.language_model]

    @property
    def language_model(self) -> ComponentSpec | None:
        """The language model component (the first, for a family with alternatives)."""
        return next(iter(self.language_models), None)


@schema
class RenameRule:
    source: str  # template in the source architecture
    target: str | list[str]  # template(s) in the target architecture
    transform: str = "identity"  # named transform in omgtool.kernels.transforms


@schema
class ConfigRewrite:
    drop: list[str] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)


@schema
class ConversionMapping:
    kind: Literal["conversion"]
    name: str
    description: str
    source: str  # architecture name
    target: str
    rules: list[RenameRule]
    config: ConfigRewrite = field(default_factory=ConfigRewrite)
    defaults: dict[str, Any] = field(default_factory=dict)


@schema
class PrefixRule:
    source: str  # key prefix in the source file
    target: str  # the prefix it becomes in the target module's state dict


@schema
class KeyLayout:
    """One way a file can name the weights: prefix renames, plus prefixes knowingly ignored."""

    name: str
    description: str = ""
    rules: list[PrefixRule]
    ignore: list[str] = field(default_factory=list)  # prefixes of keys the target does not use


@schema
class KeyMapMapping:
    """Prefix renames from the layouts a file may have to a module's own state-dict names
    (e.g. the OMG-Seg checkpoint or an open_clip state dict -> open_clip's vision tower)."""

    kind: Literal["keymap"]
    name: str
    description: str
    model: str  # what the keys load into
    required: list[str] = field(default_factory=list)  # target prefixes that must all be present
    layouts: list[KeyLayout]


Mapping = ArchitectureMapping | FamilyMapping | ConversionMapping | KeyMapMapping


@dataclass
class Registry:
    architectures: dict[str, ArchitectureMapping]
    families: dict[str, FamilyMapping]
    conversions: dict[str, ConversionMapping]
    root: Path
    keymaps: dict[str, KeyMapMapping] = field(default_factory=dict)

    def architecture(self, name: str) -> ArchitectureMapping:
        try:
            return self.architectures[name]
        except KeyError:
            raise InvalidArgument(f"no architecture mapping named {name!r} in {self.root}") from None

    def family(self, name: str) -> FamilyMapping:
        try:
            return self.families[name]
        except KeyError:
            raise InvalidArgument(f"no family mapping named {name!r} in {self.root}; families: "
                                  f"{', '.join(sorted(self.families))}") from None

    def conversion(self, source: str, target: str) -> ConversionMapping:
        for conv in self.conversions.values():
            if conv.source == source and conv.target == target:
                return conv
        raise InvalidArgument(f"no conversion mapping from {source} to {target} in {self.root}")

    def keymap(self, name: str) -> KeyMapMapping:
        try:
            return self.keymaps[name]
        except KeyError:
            raise InvalidArgument(f"no keymap mapping named {name!r} in {self.root}") from None


@lru_cache(maxsize=4)
def load_registry(root: Path | None = None) -> Registry:
    root = root or mappings_dir()
    kinds = {"architecture": ArchitectureMapping, "family": FamilyMapping, "conversion": ConversionMapping,
             "keymap": KeyMapMapping}
    reg = Registry({}, {}, {}, root)
    files = [(path, path.read_bytes()) for path in sorted(root.glob("*.toml"))]
    cached = mapping_cache.load(files, SCHEMAS)  # validated before, byte-identical: no pydantic
    loaded = []
    for i, (path, raw) in enumerate(files):
        try:
            if cached is not None:
                mapping = cached[i]
            else:
                data = tomllib.loads(raw.decode("utf-8"))
                mapping = _validate(kinds[data.get("kind", "")], data)
            loaded.append(mapping)
        except UnicodeDecodeError:
            raise InvalidArgument(f"{path}: invalid mapping: not UTF-8 text") from None
        except KeyError:
            raise InvalidArgument(f"{path}: 'kind' must be one of {sorted(kinds)}") from None
        except (tomllib.TOMLDecodeError, _Invalid) as exc:
            first = str(exc).splitlines()
            raise InvalidArgument(f"{path}: invalid mapping: {' '.join(first[:3])}") from None
        table = {"architecture": reg.architectures, "family": reg.families,
                 "conversion": reg.conversions, "keymap": reg.keymaps}[mapping.kind]
        if mapping.name in table:
            raise InvalidArgument(f"{path}: duplicate mapping name {mapping.name!r}")
        table[mapping.name] = mapping
    if cached is None:
        mapping_cache.store(files, loaded)
    for fam in reg.families.values():
        for comp in fam.components:
            if comp.architecture not in reg.architectures:
                raise InvalidArgument(f"family {fam.name}: component {comp.name} names unknown "
                                      f"architecture {comp.architecture!r}")
    for conv in reg.conversions.values():
        for arch in (conv.source, conv.target):
            if arch not in reg.architectures:
                raise InvalidArgument(f"conversion {conv.name}: unknown architecture {arch!r}")
    return reg


# --- key matching -------------------------------------------------------------------------

Role = Literal["weight", "lora_A", "lora_B", "dora_magnitude"]


@dataclass(frozen=True)
class KeyMatch:
    key: str  # the original key
    component: str
    weight: str  # base weight name inside the component, layer filled in
    template: str
    group: str  # "<component>.<group>", or "<component>.lora" for LoRA factors
    role: Role
    layer: int | None
    spec: WeightSpec

    @property
    def canonical(self) -> str:
        """Name used to pair keys across wrappers and files: component, weight, role."""
        suffix = "" if self.role == "weight" else f"#{self.role}"
        return f"{self.component}:{self.weight}{suffix}"

    @property
    def module(self) -> str:
        """The LoRA target's short name: `wqkv`, `w1`, `output`, `q_proj`."""
        stem = self.weight.rsplit(".", 1)[0]
        return stem.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class TemplateMatch:
    layer: str | None  # the digits `{layer}` stood for; None for a template without it


class Template:
    """A weight-name template, matched whole: literal text, where `{layer}` stands for 1-9
    ASCII digits (at most one `{layer}` per template)."""

    def __init__(self, template: str):
        self.template = template
        head, sep, tail = template.partition("{layer}")
        if "{layer}" in tail:
            raise InvalidArgument(f"template {template!r}: more than one {{layer}}")
        self.head, self.tail, self.has_layer = head, tail, bool(sep)

    def match(self, name: str) -> TemplateMatch | None:
        if not self.has_layer:
            return TemplateMatch(None) if name == self.template else None
        if not (name.startswith(self.head) and name.endswith(self.tail)):
            return None
        digits = name[len(self.head):len(name) - len(self.tail)]
        if 1 <= len(digits) <= 9 and digits.isascii() and digits.isdigit() \
                and len(self.head) + len(digits) + len(self.tail) == len(name):
            return TemplateMatch(digits)
        return None


_PEFT_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<lora>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|(?P<emb>lora_embedding_[AB])(?:\.(?P<adapter2>[^.]+))?"
    r"|lora_magnitude_vector(?:\.(?P<adapter3>[^.]+))?(?:\.weight)?"
    r"|base_layer\.(?P<param>weight|bias)"
    r"|(?:modules_to_save\.[^.]+|original_module)\.(?P<param2>weight|bias)"
    r")$")


def split_peft(rest: str) -> tuple[str, Role]:
    """`x.lora_A.default.weight` -> (`x.weight`, lora_A); plain names pass through."""
    m = _PEFT_SUFFIX.match(rest)
    if not m:
        return rest, "weight"
    module = m.group("module")
    if m.group("lora"):
        return f"{module}.weight", m.group("lora")  # type: ignore[return-value]
    if m.group("emb"):
        return f"{module}.weight", "lora_A" if m.group("emb").endswith("A") else "lora_B"
    if m.group("param") or m.group("param2"):
        return f"{module}.{m.group('param') or m.group('param2')}", "weight"
    return f"{module}.weight", "dora_magnitude"


class FamilyMatcher:
    def __init__(self, family: FamilyMapping, registry: Registry):
        self.family = family
        self.entries: list[tuple[ComponentSpec, str, list[tuple[Template, WeightSpec]]]] = []
        for comp in family.components:
            arch = registry.architecture(comp.architecture)
            compiled = [(Template(w.name), w) for w in arch.weights]
            for prefix in sorted(comp.prefixes, key=len, reverse=True):
                self.entries.append((comp, prefix, compiled))

    def match(self, key: str) -> KeyMatch | None:
        for comp, prefix, compiled in self.entries:
            if not key.startswith(prefix):
                continue
            weight, role = split_peft(key[len(prefix):])
            for regex, spec in compiled:
                m = regex.match(weight)
                if m is None:
                    continue
                if role != "weight" and not spec.lora_target:
                    continue
                layer = int(m.layer) if m.layer is not None else None
                group = group_name(comp.name, {"lora_A": "lora", "lora_B": "lora",
                                               "dora_magnitude": "dora"}.get(role, spec.group))
                return KeyMatch(key, comp.name, weight, spec.name, group, role, layer, spec)
        return None


def group_name(component: str, group: str) -> str:
    """`llm.embeddings`; a group named like its component is just `projector`."""
    return component if group == component else f"{component}.{group}"


def match_keys(keys, family: FamilyMapping, registry: Registry | None = None):
    """(matches by key, unexplained keys in input order)."""
    matcher = FamilyMatcher(family, registry or load_registry())
    matches: dict[str, KeyMatch] = {}
    unexplained: list[str] = []
    for key in keys:
        m = matcher.match(key)
        if m is None:
            unexplained.append(key)
        else:
            matches[key] = m
    return matches, unexplained


def group_descriptions(family: FamilyMapping, registry: Registry) -> dict[str, str]:
    out = {}
    for comp in family.components:
        arch = registry.architecture(comp.architecture)
        for group, text in arch.groups.items():
            out[group_name(comp.name, group)] = text
        out[group_name(comp.name, "lora")] = f"LoRA factors (A: [r, in], B: [out, r]) on {comp.name} linears"
        out[group_name(comp.name, "dora")] = "DoRA magnitude vectors (a different merge; refused)"
    out["unexplained"] = "keys no mapping explains: carried through conversions, never dropped"
    return out
