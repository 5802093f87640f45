"""Where a compiled step spends its time, from XLA's own output: the optimised HLO
(``compiled.as_text()``) and a ``jax.profiler`` trace of the CPU thunks.

Used by ``benchmarks/lora_train_step.py --profile``; also a library for ad-hoc analysis::

    from xla_profile import hlo_summary, profile_thunks, breakdown
    summary = hlo_summary(compiled.as_text(), rank=8)      # deterministic: op counts, bytes
    times = profile_thunks(lambda: run_one_step(), steps=3)  # {thunk name: mean µs per step}
    print(breakdown(compiled.as_text(), times, rank=8))      # forward/backward x dot/elementwise x LoRA/base

Every instruction of the ENTRY computation of the optimised module is one thunk of the
XLA:CPU runtime (a fusion, a dot, a copy, ...); the profiler's trace names each event by
the instruction it ran (``args.hlo_op``), so the two can be joined. An instruction is
counted as **LoRA** when one of its operands or its result has an axis of the LoRA rank
(pick a rank that no model dimension has: 8 for GPT-2 small), as **backward** when its
``op_name`` metadata contains ``transpose(`` (JAX's reverse pass), **forward** under
``jvp(``, else **optimizer/other**.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import shutil
import tempfile
from typing import Callable

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[a-z]+[0-9]+)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        out.append((dtype, tuple(int(d) for d in dims.split(",")) if dims else ()))
    return out


def _nbytes(shapes) -> int:
    total = 0
    for dtype, dims in shapes:
        n = 1
        for d in dims:
            n *= d
        total += n * _ITEMSIZE.get(dtype, 4)
    return total


def parse_hlo(hlo: str) -> tuple[dict, str]:
    """``({computation: {instruction: info}}, entry name)`` of optimised HLO text; info has
    ``shape`` (text), ``op``, ``calls`` (fused computation), ``op_name``, ``operands``."""
    comps: dict[str, dict] = {}
    cur = None
    entry = ""
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            head = line.split()
            name = (head[1] if head[0] == "ENTRY" else head[0]).lstrip("%")
            cur = comps.setdefault(name, {})
            if head[0] == "ENTRY":
                entry = name
            continue
        m = _INSTR.match(line)
        if m is None or cur is None:
            continue
        name, shape, op, rest = m.groups()
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        cur[name] = dict(shape=shape, op=op, calls=calls.group(1) if calls else None,
                         op_name=op_name.group(1) if op_name else "", operands=operands)
    return comps, entry


def classify(hlo: str, rank: int) -> dict[str, dict]:
    """Per ENTRY instruction: ``phase`` (fwd/bwd/opt), ``dot`` (bool), ``lora`` (bool),
    ``bytes`` (operands + result), ``op``."""
    comps, entry = parse_hlo(hlo)
    instrs = comps.get(entry, {})
    out = {}
    for name, ins in instrs.items():
        if ins["op"] in _FREE:
            continue
        on = ins["op_name"]
        phase = "bwd" if "transpose(" in on else "fwd" if "jvp(" in on else "opt"
        body = comps.get(ins["calls"], {}) if ins["calls"] else {}
        dot = ins["op"] in ("dot", "convolution") or any(b["op"] in ("dot", "convolution") for b in body.values())
        result = _shapes(ins["shape"])
        operands = [s for o in ins["operands"] if o in instrs for s in _shapes(instrs[o]["shape"])]
        lora = any(rank in dims for _, dims in result + operands)
        out[name] = dict(phase=phase, dot=dot, lora=lora, bytes=_nbytes(result) + _nbytes(operands), op=ins["op"],
                         shape=ins["shape"], op_name=on)
    return out


def hlo_summary(hlo: str, rank: int) -> dict:
    """Deterministic counts: ``thunks`` (ENTRY instructions that run), ``dots``, and the
    same restricted to LoRA-rank instructions, plus their operand+result bytes."""
    cls = classify(hlo, rank)
    lora = [c for c in cls.values() if c["lora"]]
    return {
        "thunks": len(cls),
        "dots": sum(c["dot"] for c in cls.values()),
        "lora_thunks": len(lora),
        "lora_dots": sum(c["dot"] for c in lora),
        "bytes": sum(c["bytes"] for c in cls.values()),
        "lora_bytes": sum(c["bytes"] for c in lora),
    }


def profile_thunks(run_step: Callable[[], None], steps: int = 3) -> dict[str, float]:
    """Mean wall time (µs) per step of each XLA:CPU thunk, from a ``jax.profiler`` trace of
    ``steps`` calls of ``run_step`` (which must block until its step is done)."""
    import jax

    outdir = tempfile.mkdtemp(prefix="jlora_trace_")
    try:
        jax.profiler.start_trace(outdir)
        for _ in range(steps):
            run_step()
        jax.profiler.stop_trace()
        files = glob.glob(outdir + "/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(files[0]))["traceEvents"] if files else []
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    dur: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            dur[e["args"]["hlo_op"]] += e["dur"] / steps
    return dict(dur)


def breakdown(hlo: str, times: dict[str, float], rank: int) -> list[tuple[str, float, int, int]]:
    """``[(category, ms per step, thunks, MB moved)]`` sorted by time; categories are
    ``fwd|bwd|opt`` / ``dot|elementwise`` / ``lora|base``."""
    cls = classify(hlo, rank)
    agg: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, 0])
    for name, us in times.items():
        c = cls.get(name)
        key = "other" if c is None else f"{c['phase']}/{'dot' if c['dot'] else 'elementwise'}/{'lora' if c['lora'] else 'base'}"
        agg[key][0] += us / 1e3
        agg[key][1] += 1
        agg[key][2] += 0 if c is None else c["bytes"]
    rows = [(k, v[0], v[1], v[2] // 10**6) for k, v in agg.items()]
    return sorted(rows, key=lambda r: -r[1])
