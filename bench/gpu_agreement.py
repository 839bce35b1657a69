"""All-GPU against all-CPU logits on a few prompts, beside the model's own sensitivity to rounding.

For each prompt: the argmax agreement at every position, the worst row relative difference
||gpu - cpu|| / ||cpu||, and each position where the argmax differs with the CPU's top-2 logit
gap there (a near-tie when it is under --tie). Then the baseline: the all-CPU run again with
its input embeddings moved by float32 rounding (relative noise of 2e-7), which shows how far
the model itself carries a difference of that size; a GPU whose logits part from the CPU's by
no more than that agrees as well as float arithmetic allows.

    python bench/gpu_agreement.py                 # on the GPU (CuPy)
    python bench/gpu_agreement.py --emulated      # no GPU: the SIMT emulator (minutes a prompt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "The quick brown fox jumps over the lazy dog. In the beginning",
    "Water boils at 100 degrees Celsius, and freezes at",
    "1, 2, 3, 4, 5, 6,",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill. "
    "Meanwhile, in the kitchen, a kettle begins to whistle softly and the bread is ready.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and oxygen. It takes place mostly in the leaves, where",
    "import numpy as np\n\ndef mean(values):\n    total = 0\n    for v in values:",
    "Dear team, thank you all for your hard work this quarter. Our sales grew by",
    "Q: What is the largest planet in the solar system?\nA:",
)


def row_rel(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def compare(got: np.ndarray, ref: np.ndarray, tie: float) -> dict:
    """Agreement of two (positions, vocab) logit arrays; misses with the CPU's top-2 gap."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    same = got.argmax(-1) == ref.argmax(-1)
    return {
        "positions": len(same), "agree": int(same.sum()), "worst_rel": float(row_rel(got, ref).max()),
        "misses": [(int(i), round(float(gap[i]), 4)) for i in np.nonzero(~same)[0]],
        "agree_or_tie": int(np.sum(same | (gap <= tie))),
    }  # fmt: skip


def perturbed_logits(runner: object, ids: list[int], seed: int) -> np.ndarray:
    """The all-CPU logits with the input embeddings times (1 + 2e-7 N(0, 1))."""
    model = runner.model  # type: ignore[attr-defined]
    x = model.embed(ids)
    x = (x * (1 + 2e-7 * np.random.default_rng(seed).standard_normal(x.shape))).astype(np.float32)
    for block in model.blocks:
        block.forward(x, 0, model.n_threads or 0)
    return model.logits(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalog name or .gguf path")
    p.add_argument("--tie", type=float, default=0.5, help="a top-2 gap at most this is a near-tie")
    p.add_argument("--emulated", action="store_true", help="no GPU: the tests' CuPy stand-in and SIMT emulator")
    p.add_argument("--no-head", action="store_true", help="keep the output head on the CPU")
    args = p.parse_args(argv)
    if args.emulated:
        sys.path.insert(0, str(ROOT / "tests"))
        from gpu_emulator import fake_cupy

        fake_cupy.install()
    from hybridllm.runner import Runner

    cpu = Runner(args.model, n_ctx=64, n_threads=None, n_gpu_layers=0)
    gpu = Runner(args.model, n_ctx=64, n_gpu_layers="all", gpu_margin=0, head_on_gpu=not args.no_head)
    print(f"{gpu.model_name}: {gpu.plan.n_gpu_layers} blocks on {gpu.gpu_label}, head on the {gpu.plan.output}")
    total = {"positions": 0, "agree": 0, "agree_or_tie": 0, "worst_rel": 0.0}
    base = dict(total)
    for prompt in PROMPTS:
        ids = cpu.tokenize(prompt)
        ref = cpu.logits(ids)
        g = compare(gpu.logits(ids), ref, args.tie)
        b = [compare(perturbed_logits(cpu, ids, seed), ref, args.tie) for seed in range(3)]
        for acc, r in [(total, g), *((base, x) for x in b)]:
            for key in ("positions", "agree", "agree_or_tie"):
                acc[key] += r[key]
            acc["worst_rel"] = max(acc["worst_rel"], r["worst_rel"])
        print(f"{prompt!r}: GPU {g['agree']}/{g['positions']}, worst rel {g['worst_rel']:.2e}, misses (position, CPU top-2 gap) "
              f"{g['misses']}; CPU + 2e-7 noise: {[x['agree'] for x in b]}/{g['positions']}, worst rel {max(x['worst_rel'] for x in b):.2e}")  # fmt: skip
    for name, t in (("GPU", total), ("CPU + 2e-7 noise (3 seeds)", base)):
        print(f"{name}: argmax {t['agree']}/{t['positions']} = {t['agree'] / t['positions']:.3f}, equal or a near-tie "
              f"(gap <= {args.tie}) {t['agree_or_tie'] / t['positions']:.3f}, worst row rel {t['worst_rel']:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
