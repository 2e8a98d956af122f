"""Weight-name templates (omgtool.arch.mapping.Template) match whole names, `{layer}` = 1-9 ASCII digits."""

from __future__ import annotations

import re

import pytest

from omgtool.arch.mapping import Template, load_registry
from omgtool.errors import InvalidArgument


def _regex(template: str) -> re.Pattern:  # the meaning spelled as a regex: the oracle
    head, _, tail = template.partition("{layer}")
    body = re.escape(head) + ("([0-9]{1,9})" + re.escape(tail) if "{layer}" in template else "")
    return re.compile(body + r"\Z")


@pytest.mark.parametrize("name,layer", [
    ("model.layers.0.attention.wqkv.weight", "0"), ("model.layers.31.attention.wqkv.weight", "31"),
    ("model.layers.123456789.attention.wqkv.weight", "123456789"),
    ("model.layers.1234567890.attention.wqkv.weight", None), ("model.layers..attention.wqkv.weight", None),
    ("model.layers.\u0663.attention.wqkv.weight", None), ("model.layers.3.attention.wqkv.weight\n", None),
    ("xmodel.layers.3.attention.wqkv.weight", None), ("model.layers.3.attention.wqkv.weights", None),
    ("model.layers.3.x.attention.wqkv.weight", None), ("model.layers.-3.attention.wqkv.weight", None),
])
def test_layer_template(name, layer):
    m = Template("model.layers.{layer}.attention.wqkv.weight").match(name)
    assert (m.layer if m else None) == layer
    oracle = _regex("model.layers.{layer}.attention.wqkv.weight").match(name)
    assert (oracle.group(1) if oracle else None) == layer


def test_plain_template_and_refusals():
    t = Template("output.weight")
    assert t.match("output.weight").layer is None
    assert t.match("output.weight.x") is None and t.match("xoutput.weight") is None
    with pytest.raises(InvalidArgument, match="more than one"):
        Template("a.{layer}.b.{layer}")


def test_every_shipped_template_agrees_with_the_regex_oracle():
    reg = load_registry()
    names = [f"{w.name}" for a in reg.architectures.values() for w in a.weights]
    probes = [n.replace("{layer}", d) for n in names for d in ("0", "7", "31", "1000000000", "", "a")]
    for template in names:
        ours, oracle = Template(template), _regex(template)
        for probe in probes:
            got, want = ours.match(probe), oracle.match(probe)
            assert (got is None) == (want is None), (template, probe)
