"""The embedded instruction set: small tasks a tiny model learns in a minute.

Three tasks in prompt/completion form: adding two small numbers, reversing a
word, and sorting a few digits. Generation is deterministic in the seed, and
the held-out prompts never occur in the training split. ``preference_pairs``
makes them prompt/chosen/rejected pairs (data=synthetic_preference, for
trainer=dpo): the right answer chosen, a near miss of it rejected.
"""

import random

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a} {b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"reverse {word}=", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"sort {' '.join(map(str, digits))}=", " ".join(map(str, sorted(digits)))


TASKS = (_add, _reverse, _sort)
DIGITS = "0123456789"


def near_miss(answer: str, rng: random.Random) -> str:
    """``answer`` with one digit or letter changed: a wrong answer that differs only where it matters."""
    positions = [i for i, c in enumerate(answer) if c.isalnum()]
    i = rng.choice(positions)
    pool = DIGITS if answer[i].isdigit() else LETTERS
    return answer[:i] + rng.choice([c for c in pool if c != answer[i]]) + answer[i + 1 :]


def preference_pairs(rows: list[dict], seed: int) -> list[dict]:
    """{"prompt", "completion"} rows as {"prompt", "chosen", "rejected"}: the completion chosen, a near miss of it
    rejected."""
    rng = random.Random(seed)
    return [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": near_miss(r["completion"], rng)} for r in rows
    ]


def unpaired(pairs: list[dict]) -> list[dict]:
    """Preference pairs as KTO's rows: each chosen answer desirable, each rejected one not."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def synthetic_splits(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) lists of {"prompt", "completion"} with disjoint prompts."""
    rng = random.Random(seed)
    eval_rows, seen = [], set()
    while len(eval_rows) < num_eval:
        prompt, completion = rng.choice(TASKS)(rng)
        if prompt not in seen:
            seen.add(prompt)
            eval_rows.append({"prompt": prompt, "completion": completion})
    train_rows = []
    while len(train_rows) < num_train:
        prompt, completion = rng.choice(TASKS)(rng)
        if prompt not in seen:
            train_rows.append({"prompt": prompt, "completion": completion})
    return train_rows, eval_rows
