"""What a compiled program's collectives deliver to each device: bytes by kind, read from its HLO text.

    compiled = jax.jit(step).lower(...).compile()
    moved = collective_bytes(compiled.as_text())   # {"all-gather": bytes, "collective-permute": ..., ...}

A collective's output is what the device receives, so its bytes are the output's size (each part
of a combined collective's tuple counted). Compiled for a GPU, most collectives are asynchronous
pairs, and their ``-start`` result also holds what the op keeps until ``-done``:

- ``all-gather-start``, ``reduce-scatter-start``, ``all-to-all-start``: (operands, outputs), and
  ``collective-permute-start``: (operand, output, contexts ...): the second item is counted;
- ``all-reduce-start``: the outputs themselves;
- ``async-start`` (reduce-scatter, all-to-all, ... wrapped in a computation): the wrapped op is
  printed in that computation as a plain collective and counted there, the wrapper not at all.

``-done`` ops move nothing new. The bytes are per program, so per device under SPMD; a collective
inside a loop's body counts once, however often the loop runs.
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("all-gather", "collective-permute", "all-reduce", "reduce-scatter", "all-to-all")
_OP = re.compile(r"= (?P<result>\(.*?\)|\S+) (?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")  # /*index=5*/ in long tuples
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_ITEM_BYTES |= {"f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}


def _parse(text: str):
    """An HLO result type -> nested lists of (dtype, dims) leaves, e.g. '(f32[2], (s32[], bf16[3,4]))'."""
    pos = 0

    def value():
        nonlocal pos
        if text[pos] == "(":
            pos += 1
            items = []
            while text[pos] != ")":
                items.append(value())
                while text[pos] in ", ":
                    pos += 1
            pos += 1
            return items
        match = _ARRAY.match(text, pos)
        if match is None:
            raise ValueError(f"not an HLO array type at {text[pos : pos + 30]!r} in {text!r}")
        pos = match.end()
        if pos < len(text) and text[pos] == "{":  # the layout
            pos = text.index("}", pos) + 1
        return (match.group(1), tuple(int(d) for d in match.group(2).split(",") if d))

    return value()


def _bytes(tree) -> int:
    if isinstance(tree, list):
        return sum(_bytes(t) for t in tree)
    dtype, dims = tree
    if dtype not in _ITEM_BYTES:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return _ITEM_BYTES[dtype] * int(np.prod(dims, dtype=np.int64))


def _received(kind: str, start: bool, result) -> int:
    if not start:
        return _bytes(result)
    if kind == "all-reduce":  # the outputs
        return _bytes(result)
    return _bytes(result[1])  # (operands, outputs, ...)


def collective_bytes(hlo: str) -> dict[str, int]:
    """{kind: bytes each device receives from the collectives of that kind in ``hlo``}, every kind
    of ``KINDS`` present (0 where none runs)."""
    total = dict.fromkeys(KINDS, 0)
    for line in hlo.splitlines():
        match = _OP.search(_COMMENT.sub("", line))
        if match is not None:
            kind, start = match.group("kind"), match.group("start") is not None
            total[kind] += _received(kind, start, _parse(match.group("result")))
    return total
