"""Executes one notebook with nbclient in *this* Python's environment and prints its text
outputs as JSON: ``python tests/support/run_notebook.py NOTEBOOK [--subs JSON] [--save OUT.ipynb]``.

Run by the tests with the pinned environment's Python and with ``.venv-tf5``'s (the
kernel is ``python3`` of the interpreter that runs this file). ``--subs`` is
``{"old line": "new line"}``, applied to code cells before execution (as papermill sets
parameters), e.g. ``{"MODEL = None": "MODEL = '/tmp/tiny-qwen3'"}``; each must match.
``--save`` writes the executed notebook (to look at its plots). The notebook must be
stored without outputs. Exit status 1 with the failing cell's
error on stderr if a cell raises.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    import nbclient
    import nbformat

    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("notebook")
    ap.add_argument("--subs", default="{}")
    ap.add_argument("--save")
    args = ap.parse_args()
    path = Path(args.notebook).resolve()
    subs = json.loads(args.subs)
    nb = nbformat.read(path, as_version=4)
    used = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            print(f"{path.name}: stored with outputs", file=sys.stderr)
            return 2
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            for old, new in subs.items():
                if line.strip() == old or line.startswith(old + " ") or line.startswith(old + "#"):
                    lines[i] = new
                    used.add(old)
        cell.source = "\n".join(lines)
    missing = set(subs) - used
    if missing:
        print(f"{path.name}: no line starts with {sorted(missing)}", file=sys.stderr)
        return 2
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        print(str(err)[-6000:], file=sys.stderr)
        return 1
    finally:
        if args.save:
            nbformat.write(nb, args.save)
    # A print() may reach the notebook as several stream messages (the kernel flushes on a
    # timer), so consecutive outputs of one stream are joined as they are, other outputs by lines.
    texts, images, last = [], 0, None
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                if last == o["name"] and texts:
                    texts[-1] += o["text"]
                else:
                    texts.append(o["text"])
                last = o["name"]
                continue
            last = None
            if "text/plain" in o.get("data", {}):
                texts.append(o["data"]["text/plain"])
            if "image/png" in o.get("data", {}):
                images += 1
        last = None
    json.dump({"text": "\n".join(texts), "images": images, "seconds": time.perf_counter() - t0,
               "python": sys.executable}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
