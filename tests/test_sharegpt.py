"""Tests for aurora_rl.data.sharegpt: domain labels, prompt extraction, deterministic disjoint sampling.

Most tests use small hand-written ShareGPT files under tmp_path; the real file is parsed once per module.
"""

from __future__ import annotations

import json

import pytest

from aurora_rl.data import sharegpt
from aurora_rl.data.sharegpt import Prompt, classify_domain, domain_counts, sample_prompts


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("Why is my loop slow?\n```python\nfor i in range(10): pass\n```", "code"),
        ("def add(a, b):\n    return a + b\nwhat does this do?", "code"),
        ("import numpy as np\nx = np.zeros(3)", "code"),
        ("#include <stdio.h>\nint main() { return 0; }", "code"),
        ("const f = function(x) { return x; }", "code"),
        ("SELECT name, age FROM users WHERE age > 30", "code"),
        ("class Foo extends Bar {\n  constructor() {}\n}", "code"),
        ("public static void main(String[] args) is the entry point?", "code"),
        ("Write a poem about the sea.", "chat"),
        ("I took a class in biology and we had to select from many topics.", "chat"),
        ("What function of x is its own derivative?", "chat"),
        ("Translate 'hello' into Spanish.", "chat"),
        ("Estoy en sexto semestre, ¿me ayudas con un nombre?", "chat"),  # Latin script, few accents
        ("我想进入某python包的某个函数，我该怎么做", "non_english"),
        ("도메인이 뭐야? 기업용 이메일을 만들기 위해서는 왜 도메인이 필요한거야?", "non_english"),
        ("Привет, как дела?", "non_english"),
        ("", "chat"),
    ],
)
def test_classify_domain_on_hand_written_examples(text, domain):
    assert classify_domain(text) == domain


@pytest.mark.unit
def test_unknown_domain_lists_the_valid_ones(tiny_file):
    with pytest.raises(ValueError, match=r"'python'.*code, chat, non_english, all"):
        sample_prompts("python", 1, seed=0, path=tiny_file)


def _conversation(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": text} for who, text in turns]}


@pytest.fixture
def tiny_file(tmp_path):
    """40 chat and 10 code prompts, plus records that must be skipped; cut mid-record at the end."""
    records = [
        _conversation(f"chat{i}", ("human", f"Tell me fact number {i}."), ("gpt", "Sure."))
        for i in range(40)
    ]
    records += [
        _conversation(f"code{i}", ("human", f"```\nprint({i})\n```"), ("gpt", "It prints."))
        for i in range(10)
    ]
    records += [
        _conversation("continued_1", ("gpt", "...as I was saying"), ("human", "continue")),
        _conversation("empty"),
        _conversation("blank", ("human", "   "), ("gpt", "?")),
        _conversation("chat0", ("human", "a duplicate id"), ("gpt", "!")),
        _conversation("sys", ("system", "Be brief."), ("human", "  Hello there  "), ("gpt", "Hi")),
        _conversation("long", ("human", "x" * 5000), ("gpt", "ok")),
    ]
    text = json.dumps(records, indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: -40])  # the last record ("long") is cut, as in the packaged file
    yield path
    sharegpt.clear_cache()


@pytest.mark.unit
def test_truncated_file_keeps_complete_records_and_skips_bad_ones(tiny_file, caplog):
    with caplog.at_level("WARNING"):
        records = sharegpt.load_conversations(tiny_file)
    assert len(records) == 55 and records[-1]["id"] == "sys"
    assert "truncated" in caplog.text
    pool = sharegpt.prompt_pool(tiny_file)
    assert pool.skipped == {
        "opens with a model turn": 1,
        "empty conversation": 1,
        "empty first human turn": 1,
        "duplicate id": 1,
    }
    by_id = {p.id: p for p in pool.prompts}
    assert by_id["sys"].messages == [{"role": "user", "content": "Hello there"}]
    assert domain_counts(path=tiny_file) == {"code": 10, "chat": 41, "non_english": 0, "all": 51}


@pytest.mark.unit
def test_sampling_is_deterministic_per_seed_and_fresh(tiny_file):
    first = sample_prompts("chat", 10, seed=3, path=tiny_file)
    again = sample_prompts("chat", 10, seed=3, path=tiny_file)
    other = sample_prompts("chat", 10, seed=4, path=tiny_file)
    assert first == again and [p.id for p in first] != [p.id for p in other]
    assert all(isinstance(p, Prompt) and p.domain == "chat" for p in first)
    first[0].messages[0]["content"] = "changed"
    assert sample_prompts("chat", 10, seed=3, path=tiny_file) == again


@pytest.mark.unit
def test_skip_gives_disjoint_sets_covering_the_domain(tiny_file):
    train = sample_prompts("chat", 30, seed=0, path=tiny_file)
    held_out = sample_prompts("chat", 11, seed=0, skip=30, path=tiny_file)
    assert not {p.id for p in train} & {p.id for p in held_out}
    assert len({p.id for p in train + held_out}) == 41


@pytest.mark.unit
def test_too_few_prompts_says_how_many_there_are(tiny_file):
    with pytest.raises(ValueError, match=r"'code' has only 10 prompts.*n=8 after skip=5"):
        sample_prompts("code", 8, seed=0, skip=5, path=tiny_file)
    with pytest.raises(ValueError, match="min_chars"):
        sample_prompts("all", 1, seed=0, min_chars=10, max_chars=5, path=tiny_file)


@pytest.mark.unit
def test_char_limits_filter_first_turns(tiny_file):
    # code prompts have 16 characters, "Hello there" 11, the chat facts 22 or more
    short = sample_prompts("all", 11, seed=0, max_chars=16, path=tiny_file)
    assert {p.id for p in short} == {f"code{i}" for i in range(10)} | {"sys"}
    with pytest.raises(ValueError, match="has only 11 prompts"):
        sample_prompts("all", 12, seed=0, max_chars=16, path=tiny_file)
    assert len(sample_prompts("all", 40, seed=0, min_chars=17, path=tiny_file)) == 40


# ---------------------------------------------------------------------------------------------------
# the real embedded file, parsed once for the module


@pytest.fixture(scope="module")
def real_counts():
    counts = domain_counts()
    yield counts
    sharegpt.clear_cache()


@pytest.mark.unit
def test_real_file_has_all_domains(real_counts):
    assert set(real_counts) == {"code", "chat", "non_english", "all"}
    assert all(real_counts[d] > 0 for d in sharegpt.DOMAINS)
    assert real_counts["all"] == sum(real_counts[d] for d in sharegpt.DOMAINS)


@pytest.mark.unit
@pytest.mark.parametrize("domain", ["code", "chat", "non_english"])
def test_real_samples_are_deterministic_and_disjoint(real_counts, domain):
    n = min(20, real_counts[domain] // 2)
    train = sample_prompts(domain, n, seed=7)
    assert [p.id for p in train] == [p.id for p in sample_prompts(domain, n, seed=7)]
    held_out = sample_prompts(domain, n, seed=7, skip=n)
    assert not {p.id for p in train} & {p.id for p in held_out}
    for prompt in train + held_out:
        assert prompt.domain == domain == classify_domain(prompt.messages[0]["content"])
        assert 1 <= len(prompt.messages[0]["content"]) <= sharegpt.DEFAULT_MAX_CHARS
        assert prompt.messages[0]["role"] == "user"
