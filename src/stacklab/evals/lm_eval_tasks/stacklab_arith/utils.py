"""Data of the bundled lm-eval tasks `stacklab_arith` and `stacklab_arith_gen`.

The items are held-out (`eval` split) problems of stacklab's own arithmetic task generator,
in the tiny recipe's setting (`+` and `-`, operands of 1-2 digits), so a pretrained stacklab
model has seen their format but never these problems. Each item has the prompt, the answer and
four choices for the multiple-choice task: the answer and three near misses.

lm-eval loads this file by path (`custom_dataset: !function utils.load_arith` in the task
YAMLs), and `load_arith` reads `arith.jsonl` next to it: the data file is found wherever the
package is installed, whatever the working directory (a relative `dataset_kwargs.data_files`
would be resolved against the working directory). Regenerate the file with
`python utils.py` in this folder; tests/test_lm_eval.py checks it matches `make_items()`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).with_name("arith.jsonl")
N_ITEMS = 20
SEED = 0
NEAR_MISSES = (-10, -2, -1, 1, 2, 10)


def make_items(n: int = N_ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    """`n` held-out arithmetic problems with their answer and four shuffled choices."""
    from stacklab.data.tasks import make_generator
    from stacklab.recipe import ArithmeticTask

    gen = make_generator(ArithmeticTask(ops=["+", "-"], min_digits=1, max_digits=2))
    items = []
    for problem in gen.problems("eval", n, seed):
        rng = random.Random(f"choices:{problem.key}")
        answer = int(problem.answer)
        choices = [str(answer + d) for d in rng.sample(NEAR_MISSES, 3)] + [problem.answer]
        rng.shuffle(choices)
        items.append(
            {
                "prompt": problem.prompt,
                "answer": problem.answer,
                "choices": choices,
                "label": choices.index(problem.answer),
            }
        )
    return items


def load_arith(**_: Any) -> Any:
    """The items as a `datasets.DatasetDict` with one split, `test` (lm-eval's loader hook;
    it passes the task's metadata as keyword arguments, which are not needed here)."""
    import datasets

    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


if __name__ == "__main__":
    DATA_FILE.write_text("".join(json.dumps(item) + "\n" for item in make_items()))
    print(f"wrote {N_ITEMS} items to {DATA_FILE}")
