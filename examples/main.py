"""jlora's main job (what ``bash scripts/main.sh`` runs).

It is ``examples/finetune_minilm_retrieval.py``: LoRA fine-tuning of the pretrained
all-MiniLM-L6-v2 for retrieval over Python's own documentation, with recall@1 / MRR
before and after, the adapter saved in Orbax and PEFT formats and merged. All of that
script's flags work here (``--steps``, ``--rank``, ``--output-dir``, ``--batch-size``,
``--lr``, ``--max-len``, ``--smoke``, ...; see ``--help``).
"""

import os
import runpy
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.argv[0] = os.path.join(here, "finetune_minilm_retrieval.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
