"""What the tests that compare with llama.cpp share: a set of prompts, and our Runner beside
llama-cpp-python's Llama on one file (the oracle)."""

from __future__ import annotations

import numpy as np

from hybridllm.runner import Runner

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, Neil Armstrong became the first person to",
    "Here is a recipe for a simple tomato soup:\n1.",
    "The theory of relativity was developed by",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    "The largest planet in our solar system is",
    "A haiku about autumn leaves:\n",
    "Question: What is 12 times 7?\nAnswer:",
    "The main causes of the French Revolution were",
    "import numpy as np\n\n# Create a 3x3 identity matrix\n",
    "My favorite thing about summer is",
    "The human heart has four chambers:",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which plants",
    "The quick brown fox jumps over the lazy dog. This sentence is famous because",
    "Dear hiring manager,\n\nI am writing to apply for",
    "The Pacific Ocean is the largest ocean on Earth, covering",
    "List of the days of the week: Monday, Tuesday,",
]


class Pair:
    """Our Runner and llama.cpp's Llama on the same file."""

    def __init__(self, path: str, n_ctx: int) -> None:
        import llama_cpp  # the test extra's; modules that need it importorskip it first

        self.ours = Runner(path, n_ctx=n_ctx, n_threads=2)
        self.theirs = llama_cpp.Llama(
            path, logits_all=True, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False
        )

    def their_logits(self, ids: list[int]) -> np.ndarray:
        self.theirs.reset()
        self.theirs.eval(ids)
        return np.array(self.theirs.scores[: len(ids)], dtype=np.float32)
