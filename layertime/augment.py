"""Seeded text augmentations: the views behind InfoNCE, DiME and LiDAR (docs/design.md §5).

The paper made views with nlpaug (``SplitAug`` then ``RandomCharAug`` then ``KeyboardAug``), unseeded.
Here the same two kinds of noise are deterministic: the same (text, view, seed) always gives the same
view, on any machine and Python (each text's generator is seeded from a string of the seed, the view
and the text, which `random` hashes with SHA-512, independent of PYTHONHASHSEED).

For every whitespace-separated word of a text, in order:

1. *word split* — with probability `split_rate`, a word of 2+ characters is split in two at a
   uniformly random inner position ("representation" -> "repres entation");
2. *character noise* — each character of each resulting piece, with probability `char_rate`, is
   swapped with its right neighbour, gets a random letter inserted before it, is deleted, or is
   substituted by a random letter (one of the four, uniformly). A piece never loses its last
   character, so words never vanish.

Words are re-joined with single spaces, as nlpaug does.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

CHAR_RATE = 0.1
SPLIT_RATE = 0.1
LETTERS = string.ascii_lowercase


def _split(word: str, rng: random.Random, rate: float) -> list[str]:
    if len(word) >= 2 and rng.random() < rate:
        cut = rng.randint(1, len(word) - 1)
        return [word[:cut], word[cut:]]
    return [word]


def _char_noise(word: str, rng: random.Random, rate: float) -> str:
    chars = list(word)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if rng.random() >= rate:
            out.append(c)
        else:
            action = rng.randrange(4)
            if action == 0 and i + 1 < len(chars):  # swap with the right neighbour
                out += [chars[i + 1], c]
                i += 1
            elif action == 1:  # insert a letter before
                out += [rng.choice(LETTERS), c]
            elif action == 2 and len(chars) > 1:  # delete (never a piece's only character)
                pass
            else:  # substitute (also the fallback of a swap or delete that cannot happen)
                out.append(rng.choice(LETTERS))
        i += 1
    return "".join(out) or word


def augment(
    text: str, rng: random.Random, char_rate: float = CHAR_RATE, split_rate: float = SPLIT_RATE
) -> str:
    """One noisy copy of `text`: word splits, then character noise (see the module docstring)."""
    pieces = [p for word in text.split() for p in _split(word, rng, split_rate)]
    return " ".join(_char_noise(p, rng, char_rate) for p in pieces)


def views(
    texts: Sequence[str],
    n_views: int,
    seed: int = 0,
    char_rate: float = CHAR_RATE,
    split_rate: float = SPLIT_RATE,
) -> list[list[str]]:
    """`n_views` augmented copies of `texts`: ``views(...)[v][i]`` is view v of text i.

    Deterministic per (seed, view, text): a text's view v does not depend on the other texts or
    their order (equal texts get equal views), and asking for more views keeps the first ones, so
    the first 2 of 16 views are the 2-view set.
    """
    return [[augment(t, _rng(seed, v, t), char_rate, split_rate) for t in texts] for v in range(n_views)]


def _rng(seed: int, view: int, text: str) -> random.Random:
    return random.Random(f"layertime-augment:{seed}:{view}:{text}")
