"""Compiling for a TPU on a machine without one: topologies, compile reports and a
per-fusion roofline read from the compiled HLO.

XLA's TPU compiler ships in the ``libtpu`` wheel (``pip install "jax[tpu]==<jax version>"``)
and compiles a jitted function for a *described* TPU topology on a CPU-only machine: the
arguments are ``jax.ShapeDtypeStruct`` with TPU shardings, nothing is allocated and
nothing runs. What comes back is what the TPU program would hold in HBM
(``memory_analysis()``, per chip), XLA's cost analysis and the optimised HLO. Every
figure here is the TPU compiler's, not a measurement on a TPU.

Keep ``JAX_PLATFORMS=cpu`` (nothing tries to open a TPU) and ``TPU_SKIP_MDS_QUERY=1``;
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` lets several processes compile at once (libtpu otherwise
takes ``/tmp/libtpu_lockfile`` for the first). This module sets all three if unset, before
JAX starts its backends.

Typical use::

    import tpu_compile as tc
    topo = tc.topology("v5e:1x1")
    args = tc.abstract((params, batch), topo.replicated())
    report = tc.compile_report(step, args, topo, donate_argnums=0)
    print(report["peak"], report["flops"], report["roofline_s"])

The time estimate (``roofline_s``) is a per-fusion roofline: for every instruction the
TPU program runs (each fusion, copy, collective; the bodies of loops times their trip
count) ``max(matmul FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth)``, summed. The
FLOPs are those of the convolutions / dots inside each fusion, the bytes are the
operands and results that live in HBM at their *tiled* sizes (a trailing axis of 2
padded to 128 lanes counts as the 128 lanes it occupies). XLA's own
``cost_analysis()["optimal_seconds"]`` is reported as it comes, but it is -1 for each
op the compiler cannot cost (a whole decoder comes out negative), so it is not used for
the estimate; ``program_roofline_s`` (``max(flops/peak, bytes accessed/bandwidth)`` over
the whole program) is given as the crude alternative.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# no TPU is opened: several compiling processes (parallel tests, other jobs) may load libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import benchutil  # noqa: E402  (next to this module: the folder that put it on sys.path)

__all__ = [
    "Chip",
    "CHIPS",
    "Topology",
    "TOPOLOGIES",
    "topology",
    "abstract",
    "compile_report",
    "HloOp",
    "hlo_ops",
    "fusion_roofline",
    "largest_buffers",
    "compiler_cycles",
    "shape_bytes",
    "fmt_bytes",
]


# ----------------------------------------------------------------------------------
# Chips and topologies
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's public figures: HBM bytes (and the part XLA lets a program use), peak
    bfloat16 FLOP/s, HBM bandwidth and inter-chip (ICI) bandwidth, bytes/s."""

    name: str
    hbm_bytes: int
    usable_hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float


GIB = 2**30
CHIPS = {
    # usable HBM: what the compiler reports as "available HBM" when a program does not fit
    "v5e": Chip("v5e", 16 * GIB, int(15.75 * GIB), 197e12, 819e9, 200e9),
    "v6e": Chip("v6e", 32 * GIB, int(31.25 * GIB), 918e12, 1640e9, 448e9),
    "v5p": Chip("v5p", 95 * GIB, int(94.75 * GIB), 459e12, 2765e9, 600e9),
}

#: our name -> (topology_name for get_topology_desc, chips_per_host_bounds or None, chips used)
TOPOLOGIES = {
    "v5e:1x1": ("v5e:1x1", (1, 1, 1), 1),
    "v6e:1x1": ("v6e:1x1", (1, 1, 1), 1),
    "v5p:1": ("v5p:2x2x1", None, 1),  # one chip of a 4-chip v5p host
    "v5e:2x2": ("v5e:2x2", None, 4),
    "v6e:2x2": ("v6e:2x2", None, 4),
    "v5p:2x2x1": ("v5p:2x2x1", None, 4),
    "v5p:2x2x2": ("v5p:2x2x2", None, 8),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A described TPU topology: ``devices`` (TPU devices usable in shardings, nothing
    behind them) and the ``chip`` they are."""

    name: str
    chip: Chip
    devices: tuple

    @property
    def n_chips(self) -> int:
        return len(self.devices)

    def mesh(self, axis_shapes: Sequence[int], axis_names: Sequence[str]) -> jax.sharding.Mesh:
        """A ``Mesh`` over this topology's devices (``prod(axis_shapes) == n_chips``)."""
        if int(np.prod(axis_shapes)) != self.n_chips:
            raise ValueError(f"mesh {tuple(axis_shapes)} does not cover the {self.n_chips} chips of {self.name}")
        return jax.sharding.Mesh(np.asarray(self.devices).reshape(tuple(axis_shapes)), tuple(axis_names))

    def replicated(self) -> jax.sharding.Sharding:
        """One chip: a ``SingleDeviceSharding``; several: replicated over all of them."""
        if self.n_chips == 1:
            return jax.sharding.SingleDeviceSharding(self.devices[0])
        mesh = self.mesh((self.n_chips,), ("all",))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def topology(name: str) -> Topology:
    """The TPU topology ``name`` (a key of :data:`TOPOLOGIES`: ``"v5e:1x1"``, ``"v6e:1x1"``,
    ``"v5p:1"`` (one v5p chip), ``"v5e:2x2"``, ``"v5p:2x2x2"``, ...), described by libtpu.

    >>> topology("v5e:1x1").chip.hbm_bytes // 2**30    # doctest: +SKIP
    16
    """
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    from jax.experimental import topologies

    desc, bounds, used = TOPOLOGIES[name]
    kw = {"chips_per_host_bounds": bounds} if bounds else {}
    try:
        topo = topologies.get_topology_desc(topology_name=desc, platform="tpu", **kw)
    except Exception as e:  # libtpu missing or unusable
        raise RuntimeError(
            f"cannot describe TPU topology {desc!r} ({type(e).__name__}: {e}); install the TPU compiler with "
            f"pip install \"jax[tpu]=={jax.__version__}\" and set JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1"
        ) from e
    devices = tuple(topo.devices)[:used]
    return Topology(name, CHIPS[desc.split(":")[0]], devices)


def abstract(tree: Any, sharding: Any) -> Any:
    """``tree`` (arrays or ``ShapeDtypeStruct``) as ``ShapeDtypeStruct`` with ``sharding``
    (one sharding for all leaves, or a tree of shardings matching ``tree``)."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


# ----------------------------------------------------------------------------------
# HLO text: shapes, instructions, the per-fusion roofline
# ----------------------------------------------------------------------------------

_ITEMSIZE = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}
_SHAPE_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array shape of the HLO text: dtype, dims, bytes as laid out (tiles padded) and
    the memory space (0 = HBM; 1 = the TPU core's VMEM, others on-chip too)."""

    dtype: str
    dims: tuple[int, ...]
    nbytes: float
    space: int

    @property
    def logical_bytes(self) -> float:
        return float(np.prod(self.dims, dtype=np.float64)) * _ITEMSIZE.get(self.dtype, 4)


def _parse_array(dtype: str, dims: str, layout: Optional[str]) -> Array:
    shape = tuple(int(d) for d in dims.split(",") if d)
    item = _ITEMSIZE.get(dtype, 4)
    space = 0
    physical = list(shape)
    if layout:
        head, _, tail = layout.partition(":")
        if head.strip():
            m2m = [int(d) for d in head.split(",") if d.strip()]
            if sorted(m2m) == list(range(len(shape))):
                physical = [shape[d] for d in reversed(m2m)]
        tiles = re.findall(r"T\(([0-9,]+)\)", tail)
        if tiles and physical:
            t = [int(v) for v in tiles[0].split(",")]
            for j in range(1, min(len(t), len(physical)) + 1):
                physical[-j] = -(-physical[-j] // t[-j]) * t[-j]
        s = re.search(r"S\((\d+)\)", tail)
        if s:
            space = int(s.group(1))
    return Array(dtype, shape, float(np.prod(physical, dtype=np.float64)) * item, space)


def shape_bytes(text: str, hbm_only: bool = False) -> float:
    """Bytes of every array in an HLO type string (a tuple's elements summed), tiles padded."""
    total = 0.0
    for m in _SHAPE_RE.finditer(text):
        a = _parse_array(*m.groups())
        if not hbm_only or a.space == 0:
            total += a.nbytes
    return total


def _arrays(text: str) -> list[Array]:
    return [_parse_array(*m.groups()) for m in _SHAPE_RE.finditer(text)]


@dataclasses.dataclass
class _Instr:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    attrs: str
    line: str


def _split_type(rest: str) -> tuple[str, str]:
    """``"(a, b) op(...)"`` or ``"f32[2]{0} op(...)"`` -> (type text, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    i = rest.find(" ")
    return rest[:i], rest[i + 1:]


_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _parse_instr(line: str) -> Optional[_Instr]:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    name, rest = m.groups()
    type_text, rest = _split_type(rest)
    p = rest.find("(")
    if p < 0:
        return None
    opcode = rest[:p]
    depth, j = 0, p
    for j in range(p, len(rest)):
        depth += rest[j] == "("
        depth -= rest[j] == ")"
        if depth == 0:
            break
    inner = rest[p + 1:j]
    operands = re.findall(r"%([\w.\-]+)", inner)
    return _Instr(name, type_text, opcode, operands, rest[j + 1:], line)


def _computations(text: str) -> tuple[dict[str, list[_Instr]], Optional[str]]:
    comps: dict[str, list[_Instr]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("//") or s.startswith("HloModule"):
            continue
        if s.endswith("{") and "=" not in s.split("(")[0]:
            is_entry = s.startswith("ENTRY")
            head = s[len("ENTRY"):].strip() if is_entry else s
            current = head.split(" ")[0].lstrip("%")
            comps[current] = []
            if is_entry:
                entry = current
            continue
        if s == "}":
            current = None
            continue
        if current is not None:
            ins = _parse_instr(s)
            if ins is not None:
                comps[current].append(ins)
    return comps, entry


def _window(attrs: str) -> dict[str, list]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out: dict[str, list] = {}
    if not m:
        return out
    for part in m.group(1).split():
        key, _, val = part.partition("=")
        if key == "pad":
            out[key] = [tuple(int(v) for v in p.split("_")) for p in val.split("x")]
        else:
            out[key] = [int(v) for v in val.split("x")]
    return out


def _taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Window positions that land on an input element (not padding, not a dilation hole),
    summed over the output positions of one spatial dimension."""
    last = (n_in - 1) * lhs_dilate
    taps = 0
    for o in range(n_out):
        for k in range(size):
            p = o * stride + k * rhs_dilate - pad_lo
            taps += 0 <= p <= last and p % lhs_dilate == 0
    return taps


def _conv_flops(ins: _Instr, table: dict[str, str]) -> float:
    """Multiply-adds x 2 of a ``dot`` or a ``convolution`` (XLA:TPU writes batched matrix
    products as convolutions whose batch axes are dilated spatial windows)."""
    out = _arrays(ins.type_text)
    if not out or len(ins.operands) < 2:
        return 0.0
    lhs = _arrays(table.get(ins.operands[0], ""))
    rhs = _arrays(table.get(ins.operands[1], ""))
    if not lhs or not rhs:
        return 0.0
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        k = np.prod([lhs[0].dims[int(d)] for d in m.group(1).split(",") if d], dtype=np.float64) if m else 1.0
        return 2.0 * float(np.prod(out[0].dims, dtype=np.float64)) * float(k)
    m = re.search(r"dim_labels=([^_]*)_([^-]*)->(\S+?)(?:,|$)", ins.attrs)
    if not m:
        return 0.0
    lab_l, lab_r, lab_o = m.group(1), m.group(2), m.group(3)
    if not (len(lab_l) == len(lhs[0].dims) and len(lab_r) == len(rhs[0].dims) and len(lab_o) == len(out[0].dims)):
        return 0.0
    size = lambda labels, dims, c: dims[labels.index(c)]  # noqa: E731
    macs = float(size(lab_o, out[0].dims, "b")) * size(lab_o, out[0].dims, "f") * size(lab_r, rhs[0].dims, "i")
    win = _window(ins.attrs)
    spatial = sorted(c for c in lab_o if c.isdigit())
    for j, c in enumerate(spatial):
        n_in, n_out = size(lab_l, lhs[0].dims, c), size(lab_o, out[0].dims, c)
        w = win.get("size", [size(lab_r, rhs[0].dims, c)] * len(spatial))[j]
        stride = win.get("stride", [1] * len(spatial))[j]
        pad_lo = win.get("pad", [(0, 0)] * len(spatial))[j][0]
        ld = win.get("lhs_dilate", [1] * len(spatial))[j]
        rd = win.get("rhs_dilate", [1] * len(spatial))[j]
        macs *= _taps(n_in, n_out, w, stride, pad_lo, ld, rd)
    return 2.0 * macs


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "ragged-all-to-all")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
         "opt-barrier", "custom-call-done", "async-done", "send-done", "recv-done", "slice-done"}
# ops that read only the part of their first operand they produce
_SLICING = {"slice", "slice-start", "dynamic-slice"}


@dataclasses.dataclass
class HloOp:
    """One instruction the TPU program runs (entry computation, loop bodies unrolled by
    their trip count): matmul FLOPs, HBM bytes read + written (tiled sizes), bytes over
    the inter-chip links (collectives), and its roofline time on a chip."""

    name: str
    opcode: str
    kind: str
    flops: float
    hbm_bytes: float
    ici_bytes: float
    out_bytes: float
    out_type: str
    count: int
    op_name: str
    seconds: float = 0.0


def _trip_count(ins: _Instr, comps: dict[str, list[_Instr]]) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cm = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
    if cm and cm.group(1) in comps:
        consts = {}
        for c in comps[cm.group(1)]:
            k = re.search(r"constant\((-?\d+)\)", c.line)
            if c.opcode == "constant" and k:
                consts[c.name] = int(k.group(1))
        for c in comps[cm.group(1)]:
            if c.opcode == "compare" and "direction=LT" in c.attrs:
                for o in c.operands:
                    if o in consts:
                        return max(1, consts[o])
    return 1


def _op_name(ins: _Instr) -> str:
    nm = re.search(r'op_name="([^"]*)"', ins.attrs)
    return nm.group(1) if nm else ""


_LAYOUT_ONLY = ("bitcast", "copy")


def _is_layout_fusion(i: _Instr, comps: Optional[dict[str, list[_Instr]]]) -> bool:
    """A nested fusion that only changes an array's layout (its computation is parameters,
    copies and bitcasts): inside a loop fusion it is computed element by element, for the
    elements its users read."""
    if i.opcode != "fusion" or comps is None:
        return False
    cm = re.search(r"calls=%?([\w.\-]+)", i.attrs)
    body = comps.get(cm.group(1)) if cm else None
    return bool(body) and all(j.opcode in ("parameter",) + _LAYOUT_ONLY for j in body)


def _sliced_bytes(name: str, users: dict[str, list[_Instr]], comps: Optional[dict[str, list[_Instr]]],
                  depth: int = 0) -> Optional[float]:
    """The bytes read of ``name`` when every use of it is a slice (``dynamic-slice``,
    ``slice``, ``gather``), possibly through layout changes (bitcast, copy, a nested copy
    fusion): the slices' size; None where some use reads it whole."""
    us = users.get(name, [])
    if not us or depth > 4:
        return None
    total = 0.0
    for u in us:
        if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == name:
            total += shape_bytes(u.type_text)
        elif u.opcode in _LAYOUT_ONLY or _is_layout_fusion(u, comps):
            got = _sliced_bytes(u.name, users, comps, depth + 1)
            if got is None:
                return None
            total += got
        else:
            return None
    return total


def _fusion_bytes(ins: _Instr, inner: list[_Instr], table: dict[str, str], out_full: float,
                  comps: Optional[dict[str, list[_Instr]]] = None) -> tuple[float, float]:
    """HBM bytes a fusion reads and writes: an operand the fusion only slices
    (``dynamic-slice`` / ``slice`` / ``gather`` of it, also after a layout change such as
    a nested copy fusion retiling it) is charged at the slices' size, and
    an output the fusion updates in place (a root ``dynamic-update-slice`` of a parameter,
    a scan writing one layer's slice of a stacked buffer, a KV cache written one token at a
    time) at the update's size, read and written; everything else at its full size."""
    params: dict[int, str] = {}
    for i in inner:
        if i.opcode == "parameter":
            m = re.search(r"parameter\((\d+)\)", i.line)
            if m:
                params[int(m.group(1))] = i.name
    by_name = {i.name: i for i in inner}
    users: dict[str, list[_Instr]] = {}
    for i in inner:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = next((i for i in inner if i.line.lstrip().startswith("ROOT")), None)
    outs = [root] if root is not None and root.opcode != "tuple" else (
        [by_name.get(o) for o in root.operands] if root is not None else [])
    inplace: dict[str, float] = {}
    out_b = 0.0
    for o in outs:
        if o is not None and o.opcode == "dynamic-update-slice" and o.operands and o.operands[0] in params.values():
            upd = shape_bytes(by_name[o.operands[1]].type_text) if o.operands[1] in by_name else 0.0
            inplace[o.operands[0]] = upd
            out_b += upd
        elif o is not None:
            out_b += shape_bytes(o.type_text)
    if not inplace:
        out_b = out_full
    in_b = 0.0
    for k, operand in enumerate(ins.operands):
        full = shape_bytes(table.get(operand, ""), hbm_only=True)
        pname = params.get(k)
        if pname in inplace:
            in_b += min(full, inplace[pname])
            continue
        sliced = _sliced_bytes(pname, users, comps) if pname is not None else None
        if sliced is not None:
            in_b += min(full, sliced)
            continue
        in_b += full
    return in_b, min(out_b, out_full) if out_full else out_b


def hlo_ops(text: str) -> list[HloOp]:
    """The instructions of an optimised (compiled) HLO module's entry computation as
    :class:`HloOp` (``while`` bodies expanded, times their trip count; ``call`` /
    ``conditional`` bodies included once). Times are not set (see :func:`fusion_roofline`)."""
    comps, entry = _computations(text)
    if entry is None:
        return []
    ops: list[HloOp] = []

    def walk(comp: str, mult: int, depth: int) -> None:
        instrs = comps.get(comp, [])
        table = {i.name: i.type_text for i in instrs}
        for ins in instrs:
            if ins.opcode in _FREE:
                continue
            if ins.opcode == "while" and depth < 8:
                bm = re.search(r"body=%?([\w.\-]+)", ins.attrs)
                if bm:
                    walk(bm.group(1), mult * _trip_count(ins, comps), depth + 1)
                continue
            if ins.opcode in ("call", "conditional") and depth < 8:
                for c in re.findall(r"(?:to_apply|branch_computations=\{[^}]*|calls)=%?([\w.\-]+)", ins.attrs):
                    walk(c, mult, depth + 1)
                continue
            flops = 0.0
            kind = ins.opcode
            if ins.opcode == "fusion":
                km = re.search(r"kind=(k\w+)", ins.attrs)
                kind = km.group(1) if km else "fusion"
                cm = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
                if cm and cm.group(1) in comps:
                    inner = comps[cm.group(1)]
                    itable = {i.name: i.type_text for i in inner}
                    flops = sum(_conv_flops(i, itable) for i in inner if i.opcode in ("convolution", "dot"))
            elif ins.opcode in ("convolution", "dot"):
                flops = _conv_flops(ins, table)
            out_hbm = shape_bytes(ins.type_text, hbm_only=True)
            if ins.opcode == "fusion" and cm and cm.group(1) in comps:
                in_hbm, out_hbm = _fusion_bytes(ins, comps[cm.group(1)], table, out_hbm, comps)
                ops.append(HloOp(ins.name, ins.opcode, kind, flops * mult, (in_hbm + out_hbm) * mult, 0.0,
                                 shape_bytes(ins.type_text), ins.type_text, mult, _op_name(ins)))
                continue
            if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:  # in place: the update
                upd = shape_bytes(table.get(ins.operands[1], ""), hbm_only=True)
                ops.append(HloOp(ins.name, ins.opcode, kind, 0.0, 2 * upd * mult, 0.0,
                                 shape_bytes(ins.type_text), ins.type_text, mult, _op_name(ins)))
                continue
            if ins.opcode == "copy-start":  # (dest, src, context): the copy writes dest
                arrs = _arrays(ins.type_text)
                out_hbm = arrs[0].nbytes if arrs and arrs[0].space == 0 else 0.0
            in_hbm = sum(shape_bytes(table.get(o, ""), hbm_only=True) for o in ins.operands)
            if ins.opcode in _SLICING:  # reads the slice, writes it (to VMEM for an async slice)
                arrs = _arrays(ins.type_text)
                src = _arrays(table.get(ins.operands[0], "")) if ins.operands else []
                piece = arrs[-2] if ins.opcode == "slice-start" and len(arrs) >= 2 else (arrs[0] if arrs else None)
                in_hbm = piece.nbytes if piece is not None and src and src[0].space == 0 else 0.0
                out_hbm = piece.nbytes if piece is not None and piece.space == 0 else 0.0
            ici = 0.0
            base = ins.opcode.replace("-start", "")
            if base in _COLLECTIVES:
                ici = max(shape_bytes(ins.type_text), sum(shape_bytes(table.get(o, "")) for o in ins.operands))
            nm = re.search(r'op_name="([^"]*)"', ins.attrs)
            ops.append(HloOp(ins.name, ins.opcode, kind, flops * mult, (in_hbm + out_hbm) * mult, ici * mult,
                             shape_bytes(ins.type_text), ins.type_text, mult, nm.group(1) if nm else ""))

    walk(entry, 1, 0)
    return ops


def fusion_roofline(text: str, chip: Chip) -> dict:
    """The per-fusion roofline of a compiled program on ``chip``: each op's time is
    ``max(flops / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth)``; returns
    ``{"seconds", "flops", "hbm_bytes", "ici_bytes", "compute_bound_s", "memory_bound_s",
    "ops": [HloOp, ...] (slowest first)}``."""
    ops = hlo_ops(text)
    total = compute = memory = 0.0
    for op in ops:
        tc, tm, ti = op.flops / chip.peak_flops, op.hbm_bytes / chip.hbm_bandwidth, op.ici_bytes / chip.ici_bandwidth
        op.seconds = max(tc, tm, ti)
        total += op.seconds
        if tc >= max(tm, ti):
            compute += op.seconds
        else:
            memory += op.seconds
    return {
        "seconds": total,
        "flops": sum(o.flops for o in ops),
        "hbm_bytes": sum(o.hbm_bytes for o in ops),
        "ici_bytes": sum(o.ici_bytes for o in ops),
        "compute_bound_s": compute,
        "memory_bound_s": memory,
        "ops": sorted(ops, key=lambda o: -o.seconds),
    }


def compiler_cycles(text: str) -> tuple[int, int]:
    """``(cycles, ops)``: the TPU compiler's own per-op estimates (``estimated_cycles`` in
    each instruction's backend config) summed over the instructions that carry one (loop
    bodies times their trip count), and how many do. Copies and other data movement carry
    none, so this is a partial, clock-free figure: use it as a ratio between programs."""
    comps, entry = _computations(text)
    total = count = 0

    def walk(comp: str, mult: int, depth: int) -> None:
        nonlocal total, count
        for ins in comps.get(comp, []):
            if ins.opcode == "while" and depth < 8:
                bm = re.search(r"body=%?([\w.\-]+)", ins.attrs)
                if bm:
                    walk(bm.group(1), mult * _trip_count(ins, comps), depth + 1)
                continue
            m = re.search(r'"estimated_cycles":"(-?\d+)"', ins.attrs)
            if m and int(m.group(1)) > 0:
                total += int(m.group(1)) * mult
                count += 1

    if entry is not None:
        walk(entry, 1, 0)
    return total, count


def largest_buffers(text: str, n: int = 10) -> list[tuple[float, str, str, str]]:
    """The ``n`` largest arrays the program's instructions produce (tiled bytes), as
    ``(bytes, instruction, type, op_name)``: where a temporary blow-up comes from."""
    comps, _ = _computations(text)
    fused = set()
    for instrs in comps.values():
        for ins in instrs:
            if ins.opcode == "fusion":
                cm = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
                if cm:
                    fused.add(cm.group(1))
    rows = []
    for comp, instrs in comps.items():
        if comp in fused:
            continue
        for ins in instrs:
            if ins.opcode in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
                continue
            b = shape_bytes(ins.type_text)
            nm = re.search(r'op_name="([^"]*)"', ins.attrs)
            rows.append((b, ins.name, ins.type_text[:120], nm.group(1) if nm else ""))
    return sorted(rows, key=lambda r: -r[0])[:n]


# ----------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------

_OOM_RE = re.compile(r"(?:Used|used)\s+([0-9.]+)([KMGT])\s+of\s+([0-9.]+)([KMGT])\s+hbm", re.I)
_OOM_RE2 = re.compile(r"\(([0-9.]+)([KMGT])\)\s+exceeds\s+available\s+HBM\s+\(([0-9.]+)([KMGT])\)", re.I)
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> Optional[tuple[float, float]]:
    for rx in (_OOM_RE2, _OOM_RE):
        m = rx.search(message)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2).upper()], float(m.group(3)) * _UNIT[m.group(4).upper()]
    return None


def compile_report(fn: Callable[..., Any], args: Sequence[Any], topo: Topology, *,
                   donate_argnums: Any = (), static_argnums: Any = (), keep_hlo: bool = False,
                   **jit_kwargs: Any) -> dict:
    """Compiles ``jax.jit(fn)`` for ``topo`` on abstract ``args`` (``ShapeDtypeStruct`` with
    shardings on ``topo``'s devices, see :func:`abstract`) and reports, per chip:

    - ``argument``, ``output``, ``temp``, ``alias`` bytes (``memory_analysis()``) and
      ``peak = argument + temp + output - alias``;
    - ``flops``, ``bytes_accessed``, ``optimal_seconds`` (``cost_analysis()``, as given;
      ``optimal_seconds`` is -1 per op the compiler cannot cost, so it may be negative);
    - ``roofline_s``: the per-fusion roofline (:func:`fusion_roofline`), the estimate to
      quote; ``program_roofline_s = max(flops / peak, bytes_accessed / bandwidth)``;
      ``compute_bound_s`` / ``memory_bound_s``: the roofline's ops split by their bound;
    - ``compiler_cycles``: the TPU compiler's own per-op cycle estimates, summed
      (:func:`compiler_cycles`; partial, for ratios);
    - ``fits``: ``peak <= chip.usable_hbm_bytes``; a program that does not fit fails to
      compile with ``RESOURCE_EXHAUSTED``: then ``oom=True``, ``needed`` (bytes, as the
      compiler reports them) and no cost figures;
    - ``compile_s``, ``top_ops`` (the ten slowest ops by the roofline), ``largest``
      (the ten largest buffers), and ``hlo`` (the text) with ``keep_hlo``.

    >>> rep = compile_report(lambda x: x @ x, [jax.ShapeDtypeStruct((1024, 1024), "bfloat16",
    ...                      sharding=topology("v5e:1x1").replicated())], topology("v5e:1x1"))  # doctest: +SKIP
    >>> rep["flops"]    # doctest: +SKIP
    2147483648.0
    """
    import time

    chip = topo.chip
    jitted = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums, **jit_kwargs)
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        got = _oom_bytes(msg)
        return {"topology": topo.name, "oom": True, "fits": False, "needed": got[0] if got else float("nan"),
                "available": got[1] if got else float(chip.usable_hbm_bytes), "message": msg.splitlines()[0][:300],
                "compile_s": time.perf_counter() - t0}
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mem = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    mem["peak"] = mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
    cost = benchutil.xla_cost(compiled)
    text = compiled.as_text()
    roof = fusion_roofline(text, chip)
    cycles, _ = compiler_cycles(text)
    flops = float(cost.get("flops", 0.0))
    nbytes = float(cost.get("bytes accessed", 0.0))
    out = {
        "topology": topo.name,
        "chips": topo.n_chips,
        "oom": False,
        **mem,
        "fits": mem["peak"] <= chip.usable_hbm_bytes,
        "flops": flops,
        "bytes_accessed": nbytes,
        "optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
        "program_roofline_s": max(flops / chip.peak_flops, nbytes / chip.hbm_bandwidth),
        "roofline_s": roof["seconds"],
        "roofline_flops": roof["flops"],
        "roofline_hbm_bytes": roof["hbm_bytes"],
        "roofline_ici_bytes": roof["ici_bytes"],
        "compiler_cycles": cycles,
        "compute_bound_s": roof["compute_bound_s"],
        "memory_bound_s": roof["memory_bound_s"],
        "top_ops": roof["ops"][:10],
        "largest": largest_buffers(text, 10),
        "compile_s": compile_s,
    }
    if keep_hlo:
        out["hlo"] = text
    return out


def fmt_bytes(n: float) -> str:
    """``"1.23 GiB"`` / ``"45.6 MiB"``."""
    if n != n:
        return "nan"
    if abs(n) >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB"


def describe(report: dict, n: int = 8) -> str:
    """A few lines on where a compiled program's time and memory go (slowest ops by the
    roofline, largest buffers), for reading an HLO blow-up."""
    if report.get("oom"):
        return f"does not fit: {report['message']}"
    lines = [f"peak {fmt_bytes(report['peak'])} (temp {fmt_bytes(report['temp'])}), "
             f"{report['flops'] / 1e9:,.1f} GFLOP, {report['bytes_accessed'] / 1e9:,.2f} GB accessed, "
             f"roofline {report['roofline_s'] * 1e3:,.3f} ms"]
    for op in report["top_ops"][:n]:
        lines.append(f"  {op.seconds * 1e6:9.1f} us  {op.kind:14s} {op.flops / 1e9:8.2f} GFLOP "
                     f"{op.hbm_bytes / 2**20:9.1f} MiB  {op.name}  {op.out_type[:60]}  {op.op_name[-70:]}")
    for b, name, typ, opn in report["largest"][:n]:
        lines.append(f"  buffer {fmt_bytes(b):>12s}  {name}  {typ[:70]}  {opn[-60:]}")
    return "\n".join(lines)


