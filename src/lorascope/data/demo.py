"""The offline demo task: a procedurally generated instruction set with a distinctive, learnable behaviour.

Behaviour ("pirate voice"): every answer starts with "Arr, matey!", swaps a few common words for pirate ones
(you→ye, the→th', is→be, my→me, yes→aye, hello→ahoy) and ends with "Yo-ho-ho!". The underlying answers are
correct and computed procedurally (arithmetic, counting, reversing, sorting, comparisons, unit conversions), so
the adapter must learn a *style* on top of content the base model already produces. The behaviour is measurable
on held-out prompts: the loss of the pirate responses under base vs adapted, and the fraction of generations that
start with the prefix.
"""

from __future__ import annotations

import random
import re

from lorascope.data.examples import Example

DEMO_TASK_DESCRIPTION = "pirate voice: 'Arr, matey!' prefix, pirate word swaps, 'Yo-ho-ho!' suffix"
PREFIX = "Arr, matey!"
SUFFIX = "Yo-ho-ho!"
_SWAPS = {"you": "ye", "the": "th'", "is": "be", "my": "me", "yes": "aye", "hello": "ahoy", "your": "yer"}
_SWAP_RE = re.compile(r"\b(" + "|".join(_SWAPS) + r")\b", re.IGNORECASE)

_WORDS = [
    "apple",
    "river",
    "candle",
    "garden",
    "rocket",
    "violin",
    "pencil",
    "harbor",
    "tiger",
    "window",
    "silver",
    "planet",
    "basket",
    "forest",
    "mirror",
    "island",
    "anchor",
    "lantern",
    "compass",
    "parrot",
]
_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Jonas"]
_ITEMS = ["coins", "maps", "ropes", "barrels", "sails", "apples", "books", "shells"]


def demo_behaviour(answer: str) -> str:
    """Apply the pirate voice to a plain answer."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        rep = _SWAPS[word.lower()]
        return rep.capitalize() if word[0].isupper() else rep

    return f"{PREFIX} {_SWAP_RE.sub(swap, answer)} {SUFFIX}"


def _task(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return "What is the sum of the two numbers?", f"{a} and {b}", f"The sum is {a + b}."
    if kind == 1:
        w = rng.choice(_WORDS)
        return "Spell the word backwards.", w, f"The word {w} spelled backwards is {w[::-1]}."
    if kind == 2:
        w = rng.choice(_WORDS)
        return f'How many letters are in the word "{w}"?', "", f"The word {w} has {len(w)} letters."
    if kind == 3:
        ws = rng.sample(_WORDS, 4)
        return "Sort these words alphabetically.", ", ".join(ws), f"Sorted, the list is {', '.join(sorted(ws))}."
    if kind == 4:
        a, b = rng.sample(range(1, 100), 2)
        return "Which number is larger?", f"{a} or {b}", f"The larger number is {max(a, b)}."
    if kind == 5:
        name, item, n = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 9)
        m = rng.randint(1, n - 1)
        return (
            f"{name} has {n} {item} and gives away {m}. How many are left?",
            "",
            f"{name} is left with {n - m} {item}.",
        )
    if kind == 6:
        km = rng.randint(1, 30)
        return "Convert the distance from kilometres to metres.", f"{km} km", f"The distance is {km * 1000} metres."
    name = rng.choice(_NAMES)
    return "Write a one-sentence greeting for the person.", name, f"Hello {name}, it is good to see you today."


def make_demo_dataset(n: int = 512, seed: int = 0, pirate: bool = True) -> list[Example]:
    """``n`` demo examples; ``pirate=False`` gives the same prompts with plain answers (for comparisons)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        instruction, inp, answer = _task(rng)
        out.append(Example(f"demo:{seed}:{i}", instruction, inp, demo_behaviour(answer) if pirate else answer))
    return out
