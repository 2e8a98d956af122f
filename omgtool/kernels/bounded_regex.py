"""Match user-supplied regexes (adapter_config.json `alpha_pattern`, `rank_pattern` keys) in
time linear in the text: a Thompson NFA over Python's own parse of the pattern.

Python's `re` backtracks, so a key like `(a+)+$` takes exponential time on a module
name; PEFT matches these keys with `re`. Here the same syntax is parsed by `re` (so the
meaning is identical) and run as a set-of-states simulation. Features that need
backtracking or look-around (back-references, look-ahead/behind, conditionals, flags)
are refused with InvalidArgument, as are patterns too large to compile.
"""

from __future__ import annotations

import re
from functools import lru_cache

from omgtool.errors import InvalidArgument

try:  # Python 3.11+: the parser `re` itself uses
    from re import _constants as C  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
MAX_STATES = 20_000
MAX_TEXT_CHARS = 10_000

# NFA nodes: ("char", predicate, next) | ("split", [next...]) | ("assert", kind, next) | ("match",)


class _Builder:
    def __init__(self, pattern: str):
        self.nodes: list[list] = []
        self.pattern = pattern

    def node(self, *parts) -> int:
        if len(self.nodes) >= MAX_STATES:
            raise InvalidArgument(f"regex {self.pattern[:60]!r} is too large to match safely")
        self.nodes.append(list(parts))
        return len(self.nodes) - 1

    def patch(self, holes: list[tuple[int, int | str]], target: int) -> None:
        for node, slot in holes:
            if slot == "exit":  # the free branch of a split
                self.nodes[node][1] = [target if t is None else t for t in self.nodes[node][1]]
            else:
                self.nodes[node][slot] = target

    # Each build returns (start state, list of dangling (node, slot) exits).
    def seq(self, items) -> tuple[int, list]:
        start, holes = None, []
        for op, av in items:
            s, h = self.item(op, av)
            if start is None:
                start = s
            else:
                self.patch(holes, s)
            holes = h
        if start is None:
            n = self.node("split", [None])
            return n, [(n, "exit")]
        return start, holes

    def _split(self, targets: list) -> int:
        n = self.node("split", targets)
        return n

    def item(self, op, av) -> tuple[int, list]:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            pred = _predicate(op, av, self.pattern)
            n = self.node("char", pred, None)
            return n, [(n, 2)]
        if op is C.SUBPATTERN:
            group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise _unsupported(self.pattern, "inline flags")
            return self.seq(sub)
        if op is C.BRANCH:
            _, alternatives = av
            starts, holes = [], []
            for alt in alternatives:
                s, h = self.seq(alt)
                starts.append(s)
                holes += h
            return self._split(starts), holes
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # greedy or lazy: the same set of matches
            low, high, sub = av
            return self.repeat(low, high, sub)
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                n = self.node("assert", "begin", None)
            elif av in (C.AT_END, C.AT_END_STRING):
                n = self.node("assert", "end" if av is C.AT_END else "end_string", None)
            else:
                raise _unsupported(self.pattern, "word boundaries")
            return n, [(n, 2)]
        raise _unsupported(self.pattern, str(op).lower())

    def repeat(self, low: int, high: int, sub) -> tuple[int, list]:
        unbounded = high is C.MAXREPEAT
        copies = low + (1 if unbounded else high - low)
        if copies * max(1, _size(sub)) > MAX_STATES:
            raise InvalidArgument(f"regex {self.pattern[:60]!r}: repetition too large to match safely")
        start, holes = None, []
        for _ in range(low):  # mandatory copies
            s, h = self.seq(sub)
            if start is None:
                start = s
            else:
                self.patch(holes, s)
            holes = h
        if unbounded:
            s, h = self.seq(sub)
            loop = self._split([s, None])
            self.patch(h, loop)
            if start is None:
                start = loop
            else:
                self.patch(holes, loop)
            return start, [(loop, "exit")]
        exits = []
        for _ in range(high - low):  # optional copies
            s, h = self.seq(sub)
            opt = self._split([s, None])
            exits.append(opt)
            if start is None:
                start = opt
            else:
                self.patch(holes, opt)
            holes = h
        if start is None:
            n = self.node("split", [None])
            return n, [(n, "exit")]
        return start, holes + [(e, "exit") for e in exits]


def _size(sub) -> int:
    return sum(1 + (_size(av[2]) if op in (C.MAX_REPEAT, C.MIN_REPEAT) else 0) for op, av in sub) or 1


def _unsupported(pattern: str, what: str) -> InvalidArgument:
    return InvalidArgument(f"regex {pattern[:60]!r} uses {what}, which omgtool does not match "
                           "(it could take unbounded time); rewrite the pattern or pass --alpha")


def _category(cat) -> callable:
    table = {
        C.CATEGORY_DIGIT: lambda c: c.isdecimal(),
        C.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
        C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
        C.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
        C.CATEGORY_SPACE: lambda c: c.isspace(),
        C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    }
    if cat not in table:
        raise InvalidArgument(f"regex category {cat} is not supported")
    return table[cat]


def _predicate(op, av, pattern: str):
    if op is C.LITERAL:
        ch = chr(av)
        return lambda c: c == ch
    if op is C.NOT_LITERAL:
        ch = chr(av)
        return lambda c: c != ch
    if op is C.ANY:
        return lambda c: c != "\n"
    negate, tests = False, []
    for item_op, item_av in av:
        if item_op is C.NEGATE:
            negate = True
        elif item_op is C.LITERAL:
            tests.append(lambda c, ch=chr(item_av): c == ch)
        elif item_op is C.RANGE:
            lo, hi = item_av
            tests.append(lambda c, lo=lo, hi=hi: lo <= ord(c) <= hi)
        elif item_op is C.CATEGORY:
            tests.append(_category(item_av))
        else:
            raise _unsupported(pattern, f"character-class item {item_op}")
    return (lambda c: not any(t(c) for t in tests)) if negate else (lambda c: any(t(c) for t in tests))


@lru_cache(maxsize=256)
def compile_bounded(pattern: str) -> tuple[list, int]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidArgument(f"regex of {len(pattern)} characters is too long (cap {MAX_PATTERN_CHARS})")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise InvalidArgument(f"regex {pattern[:60]!r} is invalid ({exc})") from None
    if parsed.state.flags & ~(re.UNICODE | getattr(C, "SRE_FLAG_UNICODE", 0)):
        raise _unsupported(pattern, "flags")
    builder = _Builder(pattern)
    start, holes = builder.seq(parsed)
    builder.patch(holes, builder.node("match"))
    return builder.nodes, start


def bounded_match(pattern: str, text: str) -> bool:
    """`re.match(pattern, text) is not None`, in O(len(text) * states) time."""
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"name of {len(text)} characters is too long to match against {pattern[:40]!r}")
    nodes, start = compile_bounded(pattern)
    n = len(text)

    def closure(states: set[int], pos: int) -> set[int]:
        out, stack = set(), list(states)
        while stack:
            s = stack.pop()
            if s in out:
                continue
            out.add(s)
            node = nodes[s]
            if node[0] == "split":
                stack.extend(node[1])
            elif node[0] == "assert":
                kind = node[1]
                ok = (pos == 0 if kind == "begin" else
                      pos == n if kind == "end_string" else
                      pos == n or (pos == n - 1 and text[-1] == "\n"))
                if ok:
                    stack.append(node[2])
        return out

    current = closure({start}, 0)
    for pos, ch in enumerate(text):
        if any(nodes[s][0] == "match" for s in current):
            return True
        current = closure({nodes[s][2] for s in current if nodes[s][0] == "char" and nodes[s][1](ch)}, pos + 1)
        if not current:
            return False
    return any(nodes[s][0] == "match" for s in current)
