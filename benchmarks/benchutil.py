"""What the benchmark scripts share: XLA cost, a train step, the machine and versions,
tables, and writing a script's section of ``BENCHMARKS.md``.

Each script imports this as ``benchutil`` (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
_HEADER = "# Benchmarks\n\nEvery section below is written by the script named in it; rerun the command to update it.\n"


def xla_cost(compiled) -> dict:
    """``compiled.cost_analysis()`` as one dict (older jax returned one dict per computation)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def train_step(loss_of, tx):
    """``step((v, opt), const, batch) -> ((v, opt), loss)``: one update of the trained part
    ``v`` by the optax transformation ``tx`` on ``loss_of(v, const, batch)``; ``const`` (the
    frozen rest) gets no gradient. The benchmarks' train steps (jit it, donating the state)."""
    import jax
    import optax

    def step(state, const, batch):
        v, opt = state
        loss, g = jax.value_and_grad(lambda v: loss_of(v, const, batch))(v)
        upd, opt = tx.update(g, opt, v)
        return (optax.apply_updates(v, upd), opt), loss

    return step


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages: Iterable[str]) -> str:
    """``"jax 0.10.2, flax ..., python 3.11.7"`` for the packages that import."""
    parts = []
    for name in packages:
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception:
            pass
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


def provenance() -> str:
    """The jlora source measured: git commit, and a digest of jlora/ when it has uncommitted changes."""

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "jlora").splitlines()
    except OSError:
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    if not dirty:
        return f"commit {commit}"
    h = hashlib.sha256()
    for f in sorted((ROOT / "jlora").glob("*.py")):
        h.update(f.read_bytes())
    files = ", ".join(line[3:] for line in dirty)
    return f"commit {commit} + uncommitted changes in {files} (jlora/*.py sha256 {h.hexdigest()[:12]})"


def write_section(name: str, script: str, intro: list[str], *, command: str, source: str, packages: Iterable[str],
                  report: str) -> None:
    """Replaces the section ``name`` of BENCHMARKS.md (between its marker comments) with
    ``intro``, the command, date, jlora commit, versions and CPU, then ``report``."""
    begin = f"<!-- BEGIN {name} (written by {script} --write; do not edit by hand) -->"
    end = f"<!-- END {name} -->"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        begin,
        *intro,
        "",
        f"Command: `{command}`  ",
        f"Date: {now}  ",
        f"jlora: {source}  ",
        f"Versions: {versions(packages)}  ",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores ({platform.system()} {platform.release()})",
        "",
        report,
        end,
    ])
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)
    print(f"# wrote {BENCHMARKS_MD}")
