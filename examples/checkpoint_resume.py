"""A LoRA training loop with an Orbax ``CheckpointManager``: interrupted, then resumed.

Every ``--save-every`` steps the manager writes the adapter (A, B and the leaves trained in
full, never the frozen base, through ``jlora.io.AdapterSave``) and the optimizer
state. The run below is
"killed" at ``--interrupt-at``; a second run finds the latest checkpoint, restores the
adapter over the base parameters (``jlora.io.AdapterRestore``) and the optimizer
state, and carries on. Each step's batch is a function of the step number only, so the
resumed run must end bit-for-bit where an uninterrupted run ends; the script checks that.

    python examples/checkpoint_resume.py                    # 120 steps, interrupted at 70
    python examples/checkpoint_resume.py --smoke            # CI

To use the same loop by hand: ``--steps 120 --interrupt-at 70`` stops at step 70; run
again with ``--steps 120 --resume-only`` and it resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from pydoc_data.topics import topics
from tqdm.auto import tqdm
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import jlora
from jlora.io import AdapterRestore, AdapterSave


class Interrupted(Exception):
    pass


def setup(args):
    cfg = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4)
    model = FlaxGPT2LMHeadModel(cfg, seed=0)
    # modules_to_save: the random base's byte embeddings are trained in full (and checkpointed too)
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], modules_to_save=["wte"])
    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    return model, config, data


def batch_for_step(data, step: int, args) -> np.ndarray:
    """The batch of step ``step``: depends on the step number only (resumable)."""
    rng = np.random.default_rng([args.seed, step])
    starts = rng.integers(0, len(data) - args.seq_len - 1, args.batch_size)
    return np.stack([data[s : s + args.seq_len + 1] for s in starts])


def train(ckpt_dir: str, args, *, stop_at: int | None = None, label: str = "train"):
    """Trains to ``args.steps``, resuming from the latest checkpoint in ``ckpt_dir`` if any."""
    model, config, data = setup(args)
    forward = jlora.lora(lambda p, ids: model(ids, params=p).logits)
    tx = optax.adamw(3e-3)

    def loss_fn(trainable, frozen, ids):
        logits = forward(jlora.combine(trainable, frozen), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step_fn(trainable, frozen, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    options = ocp.CheckpointManagerOptions(save_interval_steps=args.save_every, max_to_keep=2)
    with ocp.CheckpointManager(ckpt_dir, options=options) as mngr:
        start = mngr.latest_step()
        lp = jlora.wrap(model.params, config, rng=jax.random.key(args.seed))
        trainable, frozen = jlora.partition(lp)
        opt_state = tx.init(trainable)
        if start is not None:
            restored = mngr.restore(start, args=ocp.args.Composite(
                adapter=AdapterRestore(model.params),                        # base params + saved A, B
                opt_state=ocp.args.StandardRestore(jax.eval_shape(lambda: opt_state)),
            ))
            trainable, frozen = jlora.partition(restored.adapter)
            opt_state = restored.opt_state
            print(f"[{label}] resumed from the checkpoint of step {start} in {ckpt_dir}")
        first = 0 if start is None else start
        bar = tqdm(range(first, args.steps), desc=label, unit="step", initial=first, total=args.steps, mininterval=0.5)
        for step in bar:
            if stop_at is not None and step == stop_at:
                bar.close()
                mngr.wait_until_finished()
                raise Interrupted(f"[{label}] interrupted at step {step}; checkpoints on disk: {mngr.all_steps()}")
            trainable, opt_state, loss = step_fn(trainable, frozen, opt_state, batch_for_step(data, step, args))
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
            # the state *after* step `step` is saved as step + 1 (= number of steps done)
            mngr.save(step + 1, args=ocp.args.Composite(
                adapter=AdapterSave(jlora.combine(trainable, frozen), config),
                opt_state=ocp.args.StandardSave(opt_state),
            ))
        mngr.wait_until_finished()
    return jlora.combine(trainable, frozen), float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--interrupt-at", type=int, default=70)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-dir", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--resume-only", action="store_true", help="only resume/continue the run in --ckpt-dir")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.interrupt_at, args.save_every, args.batch_size, args.seq_len = 10, 7, 3, 2, 32

    root = args.ckpt_dir or tempfile.mkdtemp(prefix="jlora_ckpt_")
    run_dir = os.path.abspath(os.path.join(root, "run"))
    if args.resume_only:
        train(run_dir, args, label="resume")
        return

    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        train(run_dir, args, stop_at=args.interrupt_at, label="run 1")
    except Interrupted as e:
        print(e)
    resumed, loss = train(run_dir, args, label="run 2")

    ref_dir = os.path.abspath(os.path.join(root, "reference"))
    shutil.rmtree(ref_dir, ignore_errors=True)
    reference, ref_loss = train(ref_dir, args, label="uninterrupted")

    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(resumed),
                                                             jax.tree_util.tree_leaves(reference))]
    same = max(diffs) == 0.0
    print(f"final loss: resumed {loss:.4f}, uninterrupted {ref_loss:.4f}")
    print(f"resumed run == uninterrupted run: {same} (max |difference| {max(diffs):.1e})")
    if args.ckpt_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    if not same:
        raise SystemExit("resume check FAILED")


if __name__ == "__main__":
    main()
