"""The collectives of a compiled (SPMD-partitioned) XLA module, read from its HLO text.

Each collective is counted as often as it runs in one call: an op inside a while loop with a
known trip count runs that many times. Shapes in partitioned HLO are per device. Bytes are
what one device sends with ring algorithms over a group of n devices: all-reduce 2(n-1)/n of
its buffer, all-gather and all-to-all (n-1)/n of the result, reduce-scatter (n-1) times its
result (the input is n results), collective-permute its whole buffer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_OP = re.compile(
    r"^\s*(?:ROOT )?%[\w.\-]+ = (?P<shape>.+?) (?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"\b(\w+)\[([\d,]*)\]")
_CALLEE = re.compile(r"(?:body|condition|calls|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")


@dataclass(frozen=True)
class Collective:
    """One collective op of the module and how often one call runs it."""

    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, per-device shape) of each buffer
    group: int  # devices taking part together
    count: int  # executions per call (loop trip counts multiplied in)
    name: str  # the op_name metadata: which part of the program it serves

    @property
    def elements(self) -> int:
        """Elements of the largest logical array it reduces or assembles (whole, not per device):
        a tuple op (XLA combines many small ones) counts per array."""
        per = max(math.prod(s) for _, s in self.arrays)
        return per * self.group if self.kind == "reduce-scatter" else per

    @property
    def buffer_bytes(self) -> int:
        return sum(math.prod(s) * _ITEMSIZE.get(d, 4) for d, s in self.arrays)

    @property
    def bytes_sent(self) -> float:
        """Bytes one device sends per execution (ring algorithms)."""
        n, b = self.group, self.buffer_bytes
        if self.kind == "collective-permute":
            return float(b)
        if n <= 1:
            return 0.0
        factor = {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1}.get(self.kind)
        return b * (factor if factor is not None else (n - 1) / n)


def _group_size(line: str) -> int:
    if m := _MESH_GROUPS.search(line):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    if m := _LIST_GROUPS.search(line):
        return len([g for g in m.group(1).split(",") if g])
    if m := _IOTA_GROUPS.search(line):
        return int(m.group(1).split(",")[-1])
    return 1


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            if m := _HEADER.match(line):
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimised HLO module (`compiled.as_text()`), with run counts."""
    comps, entry = _computations(hlo)
    counts: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        counts[name] = counts.get(name, 0) + times
        for line in comps.get(name, ()):
            trip = int(m.group(1)) if (m := _TRIP.search(line)) else 1
            for callee in _CALLEE.findall(line):
                visit(callee, times * (trip if f"body=%{callee}" in line else 1))
            if m := _BRANCHES.search(line):
                for callee in re.findall(r"%([\w.\-]+)", m.group(1)):
                    visit(callee, times)

    visit(entry, 1)
    found = []
    for name, lines in comps.items():
        for line in lines:
            if not (m := _OP.match(line)) or not counts.get(name):
                continue
            arrays = tuple(
                (d, tuple(int(x) for x in dims.split(",") if x))
                for d, dims in _ARRAY.findall(m.group("shape"))
            )
            op_name = re.search(r'op_name="([^"]*)"', line)
            found.append(
                Collective(
                    m.group("kind"),
                    arrays,
                    _group_size(line),
                    counts[name],
                    op_name.group(1) if op_name else "",
                )  # fmt: skip
            )
    return found


def summary(ops: list[Collective]) -> dict[str, dict]:
    """Per kind: ops, executions per call, bytes sent per device per call, largest array."""
    out: dict[str, dict] = {}
    for kind in KINDS:
        of_kind = [c for c in ops if c.kind == kind]
        if not of_kind:
            continue
        out[kind] = {
            "ops": len(of_kind),
            "executions": sum(c.count for c in of_kind),
            "bytes_per_device": sum(c.bytes_sent * c.count for c in of_kind),
            "largest_elements": max(c.elements for c in of_kind),
        }
    return out
