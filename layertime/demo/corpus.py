"""Deterministic English-like sentences for the offline demo world.

Every sentence is about one topic and mixes topic words with shared filler, so a
bag of words (and therefore a small language model's mean-pooled states) carries a
learnable label while no single word gives it away. The same seed always gives the
same texts: the demo world is rebuilt identically on every machine.
"""

from __future__ import annotations

import random

TOPICS: dict[str, list[str]] = {
    "sports": ["team", "match", "goal", "coach", "league", "player", "season", "score", "stadium", "referee"],
    "cooking": ["recipe", "oven", "flour", "sauce", "garlic", "kitchen", "dinner", "butter", "spice", "soup"],
    "weather": ["rain", "storm", "cloud", "wind", "forecast", "snow", "sunshine", "thunder", "fog", "heat"],
    "finance": ["bank", "loan", "market", "price", "stock", "budget", "interest", "savings", "tax", "profit"],
    "travel": [
        "train",
        "flight",
        "hotel",
        "ticket",
        "airport",
        "beach",
        "museum",
        "journey",
        "map",
        "passport",
    ],
    "music": ["song", "guitar", "concert", "band", "album", "piano", "singer", "rhythm", "melody", "drum"],
}

SUBJECTS = [
    "the old man",
    "my sister",
    "a young teacher",
    "our neighbour",
    "the small group",
    "everyone",
    "a tired student",
    "the new manager",
    "my friend",
    "the family",
]
VERBS = [
    "talked about",
    "worried about",
    "asked about",
    "wrote about",
    "thought about",
    "laughed about",
    "read about",
    "dreamed about",
    "argued about",
    "learned about",
]
ADJECTIVES = ["good", "strange", "long", "quiet", "busy", "bright", "cheap", "famous", "late", "simple"]
TIMES = [
    "yesterday",
    "last week",
    "this morning",
    "every day",
    "on sunday",
    "at night",
    "again",
    "in the spring",
    "after lunch",
    "before the holiday",
]
TEMPLATES = [
    "{subj} {verb} the {adj} {w1} {time}.",
    "{subj} {verb} the {w1} and the {w2} {time}.",
    "{time}, {subj} {verb} a {adj} {w1} near the {w2}.",
    "the {w1} was {adj}, so {subj} {verb} the {w2}.",
    "{subj} said the {w1} felt {adj} {time}, then {verb} the {w2} and the {w3}.",
]


def sentence(rng: random.Random, topic: str) -> str:
    """One sentence on `topic`, drawn with `rng`."""
    w1, w2, w3 = rng.sample(TOPICS[topic], 3)
    text = rng.choice(TEMPLATES).format(
        subj=rng.choice(SUBJECTS),
        verb=rng.choice(VERBS),
        adj=rng.choice(ADJECTIVES),
        time=rng.choice(TIMES),
        w1=w1,
        w2=w2,
        w3=w3,
    )
    return text[0].upper() + text[1:]


def labelled_sentences(n: int, seed: int, topics: list[str] | None = None) -> list[tuple[str, str]]:
    """`n` distinct (sentence, topic) pairs, topics cycled so classes are balanced."""
    rng = random.Random(seed)
    topics = topics or sorted(TOPICS)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        topic = topics[len(out) % len(topics)]
        text = sentence(rng, topic)
        if text not in seen:
            seen.add(text)
            out.append((text, topic))
    return out


def paraphrase(rng: random.Random, text: str) -> str:
    """A light rewrite of `text`: the same topic words, some filler words changed."""
    words = text.rstrip(".").split(" ")
    for i, word in enumerate(words):
        if word in ADJECTIVES and rng.random() < 0.7:
            words[i] = rng.choice(ADJECTIVES)
    return " ".join(words) + "."
