"""Corpora the representation metrics run on (docs/design.md §5).

Default, as in the paper: the first 1000 lines of wikitext-103's train split, headings and lines
under 10 characters dropped — 472 prompts, by the issue's count (not verifiable offline here). The
paper's code loads ``load_dataset("wikitext", "wikitext-103-v1")`` (the tokenised variant, rare words
as ``<unk>``), selects the first 1000 rows, drops headings (stripped text starting and ending with
``=``) and rows whose *raw* text is under 10 characters, and tokenises the raw text. We do the same,
from the dataset's current home ``Salesforce/wikitext``, and keep each line verbatim (its leading
space and trailing newline included), so the model sees the same tokens. The raw variant
(``wikitext-103-raw-v1``) has the same lines with the original words; pass ``config=`` to use it.

Alternatively, a seeded sample of a task's texts (`task_sample`), or any text file (`file_prompts`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from layertime.errors import Permanent

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-103-v1"  # the paper's choice (experiments/utils/misc/model_dataloader_utils.py)
WIKITEXT_LINES = 1000
MIN_CHARS = 10


class CorpusError(Permanent, LookupError):
    """A metrics corpus that cannot be loaded; the message says how to fix it."""


def is_heading(line: str) -> bool:
    """A wikitext section heading such as `` = Gameplay = `` or `` = = Reception = = ``."""
    s = line.strip()
    return s.startswith("=") and s.endswith("=")


def filter_lines(lines: Iterable[str]) -> list[str]:
    """Lines kept as prompts, verbatim and in order: no headings, none under MIN_CHARS characters.

    The length is that of the raw line (surrounding whitespace included), as in the paper.
    """
    return [line for line in lines if not is_heading(line) and len(line) >= MIN_CHARS]


MIN_PROMPTS = 2  # the metrics compare prompts: one alone has no spread (measure.measure)


def file_prompts(path: str | Path) -> list[str]:
    """`filter_lines` over the lines of a UTF-8 text file (line endings removed).

    CorpusError, naming the file, when it cannot be read, is not UTF-8 (the byte and its offset) or
    keeps fewer than MIN_PROMPTS prompts: refused before any model is loaded, not after."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"metrics.corpus: {path} is not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} at "
            f"offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise CorpusError(f"metrics.corpus: cannot read {path}: {e.strerror}") from None
    lines = text.splitlines()
    prompts = filter_lines(lines)
    if len(prompts) < MIN_PROMPTS:
        raise CorpusError(
            f"metrics.corpus: {path} keeps {len(prompts)} prompt(s) of its {len(lines)} line(s); the "
            f"metrics need at least {MIN_PROMPTS} (a prompt is a line of at least {MIN_CHARS} characters "
            "that is not a '= heading ='); add lines, or use corpus: wikitext-103 or tasks"
        )
    return prompts


def prefetch_command(config: str = WIKITEXT_CONFIG) -> str:
    """A shell command that puts wikitext-103 into the HF datasets cache (run where there is internet)."""
    return (
        f"python -c \"import datasets; datasets.load_dataset('{WIKITEXT_REPO}', '{config}', split='train')\""
    )


def wikitext_lines(
    n_lines: int = WIKITEXT_LINES, cache_dir: str | None = None, config: str = WIKITEXT_CONFIG
) -> list[str]:
    """The first `n_lines` rows of wikitext-103 train, unfiltered; CorpusError when unavailable."""
    import datasets

    try:
        rows = datasets.load_dataset(WIKITEXT_REPO, config, split=f"train[:{n_lines}]", cache_dir=cache_dir)
    except (OSError, ValueError) as e:  # offline and not cached: ConnectionError, FileNotFoundError
        raise CorpusError(
            f"cannot load {WIKITEXT_REPO} ({config}, train split) from the HF datasets cache: {e}. "
            f"Fetch it on a machine with internet: {prefetch_command(config)}"
        ) from None
    return list(rows["text"])


def wikitext_prompts(
    n_lines: int = WIKITEXT_LINES, cache_dir: str | None = None, config: str = WIKITEXT_CONFIG
) -> list[str]:
    """The paper's metrics corpus: `filter_lines` over the first `n_lines` lines of wikitext-103 train.

    Works offline (HF_HUB_OFFLINE=1) once the dataset is in the datasets cache; otherwise raises
    CorpusError naming the dataset and the command that fetches it.
    """
    return filter_lines(wikitext_lines(n_lines, cache_dir, config))


def task_sample(texts: Sequence[str], n: int = 1000, seed: int = 0) -> list[str]:
    """Up to `n` distinct non-blank texts of a task, drawn with a seeded generator, in corpus order.

    Duplicates and blank texts are dropped first (they add no information and blank ones cannot be
    measured); when no more than `n` remain, all are returned.
    """
    unique = [t for t in dict.fromkeys(texts) if t.strip()]
    if len(unique) <= n:
        return unique
    keep = sorted(random.Random(seed).sample(range(len(unique)), n))
    return [unique[i] for i in keep]
