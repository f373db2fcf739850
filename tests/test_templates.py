"""Prompt templates: rendered text, token budgets, user templates, offline token counting."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from permrank.core.errors import TemplateError
from permrank.core.prompts import (
    PromptBudget,
    answer_tokens,
    builtin_templates,
    count_message_tokens,
    load_template,
    render_window,
)
from permrank.core.tokens import default_tokenizer

QUERY = "how long is the life cycle of a flea"
LONG = (
    "The flea life cycle has four stages: egg, larva, pupa and adult. Depending on temperature "
    "and humidity the whole cycle takes from two weeks to eight months. "
) * 30


def passages(n: int, text: str = "passage", title: str | None = None):
    return [(f"{text} number {i}", title) for i in range(1, n + 1)]


def test_builtin_templates_are_listed() -> None:
    assert {"rankgpt", "rankzephyr"} <= set(builtin_templates())


def test_rankgpt_renders_one_turn_pair_per_passage() -> None:
    template = load_template("rankgpt")
    shown = passages(5)
    messages = render_window(template, QUERY, shown)
    # system, instruction, acknowledgement, 2 turns a passage, final instruction
    assert len(messages) == 3 + 2 * 5 + 1
    assert [m["role"] for m in messages[:3]] == ["system", "user", "assistant"]
    assert messages[0]["content"].startswith("You are RankGPT, an intelligent assistant")
    assert messages[1]["content"] == (
        "I will provide you with 5 passages, each indicated by number identifier []. \n"
        f"Rank the passages based on their relevance to query: {QUERY}."
    )
    assert messages[2]["content"] == "Okay, please provide the passages."
    for i in range(1, 6):
        user, assistant = messages[1 + 2 * i], messages[2 + 2 * i]
        assert user == {"role": "user", "content": f"[{i}] passage number {i}"}
        assert assistant == {"role": "assistant", "content": f"Received passage [{i}]."}
    final = messages[-1]
    assert final["role"] == "user"
    assert final["content"].startswith(f"Search Query: {QUERY}. \nRank the 5 passages above")
    assert "The output format should be [] > [], e.g., [1] > [2]." in final["content"]


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_rankgpt_turn_count(n: int) -> None:
    messages = render_window(load_template("rankgpt"), QUERY, passages(n))
    passage_turns = [m for m in messages if m["content"].startswith("[")]
    assert [m["content"].split("]")[0] for m in passage_turns] == [f"[{i}" for i in range(1, n + 1)]
    assert len(messages) == 4 + 2 * n


def test_rankzephyr_is_one_user_turn_with_every_passage() -> None:
    template = load_template("rankzephyr")
    messages = render_window(template, QUERY, passages(3, title=None) + [("last one", "Title")])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("You are RankLLM")
    user = messages[1]["content"]
    assert user.startswith(
        "I will provide you with 4 passages, each indicated by a numerical identifier []. "
        f"Rank the passages based on their relevance to the search query: {QUERY}.\n\n"
        "[1] passage number 1\n[2] passage number 2\n[3] passage number 3\n[4] Title: last one\n"
    )
    assert f"Search Query: {QUERY}.\nRank the 4 passages above" in user
    assert "The output format should be [] > [], e.g., [4] > [2]." in user


def test_template_hash_is_the_file_hash() -> None:
    template = load_template("rankgpt")
    data = Path(template.source).read_bytes()
    assert template.sha256 == hashlib.sha256(data).hexdigest()
    assert template.name == "rankgpt"


@pytest.mark.parametrize("name", ["rankgpt", "rankzephyr"])
@pytest.mark.parametrize("limit", [10, 37, 120])
def test_each_passage_is_cut_to_its_token_budget(name: str, limit: int) -> None:
    tokenizer = default_tokenizer()
    template = load_template(name)
    shown = [(LONG, None), ("short passage", None), (LONG, "A title " * 40)]
    messages = render_window(
        template,
        QUERY,
        shown,
        budget=PromptBudget(max_passage_tokens=limit, context_window=100_000),
        tokenizer=tokenizer,
    )
    text = "\n".join(m["content"] for m in messages)
    assert "short passage" in text
    cut_text = tokenizer.truncate(LONG, limit)
    assert tokenizer.count(cut_text) <= limit
    assert cut_text in text and LONG[: len(cut_text) + 20] not in text
    # The titled passage: title and text together stay within the budget.
    start = text.index("[3] ") + 4
    titled = text[start:].split("\n")[0]
    title, _, body = titled.partition(": ")
    assert tokenizer.count(title) + tokenizer.count(body) <= limit
    assert title.startswith("A title")


def test_short_passages_are_not_cut() -> None:
    messages = render_window(
        load_template("rankgpt"),
        QUERY,
        [("a short passage about fleas", "Fleas")],
        budget=PromptBudget(max_passage_tokens=300),
    )
    assert {"role": "user", "content": "[1] Fleas: a short passage about fleas"} in messages


def test_long_query_is_cut() -> None:
    tokenizer = default_tokenizer()
    query = "flea " * 1000
    messages = render_window(
        load_template("rankzephyr"),
        query,
        passages(2),
        budget=PromptBudget(max_query_tokens=16),
        tokenizer=tokenizer,
    )
    assert tokenizer.count(messages[1]["content"]) < 200


@pytest.mark.parametrize("name", ["rankgpt", "rankzephyr"])
@pytest.mark.parametrize("context_window", [900, 1500, 3000])
def test_whole_prompt_fits_the_context(name: str, context_window: int) -> None:
    tokenizer = default_tokenizer()
    template = load_template(name)
    shown = [(LONG, None)] * 10
    max_tokens = answer_tokens(10, tokenizer)
    messages = render_window(
        template,
        QUERY,
        shown,
        budget=PromptBudget(max_passage_tokens=300, context_window=context_window),
        tokenizer=tokenizer,
        max_tokens=max_tokens,
    )
    used = count_message_tokens(messages, tokenizer)
    assert used + max_tokens <= context_window
    # It is fitted, not emptied: most of the room goes to the passages.
    assert used + max_tokens > context_window * 0.8
    assert len(messages) == (4 + 2 * 10 if name == "rankgpt" else 2)


def test_prompt_that_cannot_fit_is_refused() -> None:
    with pytest.raises(TemplateError) as info:
        render_window(
            load_template("rankgpt"),
            QUERY,
            [(LONG, None)] * 20,
            budget=PromptBudget(context_window=600),
        )
    message = str(info.value)
    assert "a window of 20 passages does not fit a context of 600 tokens" in message
    assert "rankgpt" in message and "--window-size" in message and "--context-window" in message


def test_answer_tokens_fit_a_full_permutation() -> None:
    tokenizer = default_tokenizer()
    for n in (1, 2, 10, 20, 100):
        full = " > ".join(f"[{i}]" for i in range(n, 0, -1))
        assert answer_tokens(n, tokenizer) > tokenizer.count(full)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_user_template_from_a_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mine.toml",
        """
        description = "one line per passage"
        passage = "<{id}> {text} ({title})"
        passage_separator = " | "

        [[messages]]
        role = "user"
        content = "Q={query} N={num} {{literal}} {passages} }}end{{"
        """,
    )
    template = load_template(path)
    assert template.name == "mine"
    assert template.source == str(path)
    messages = render_window(template, "fleas", [("one", "T1"), ("two", None)])
    assert messages == [
        {"role": "user", "content": "Q=fleas N=2 {literal} <1> one (T1) | <2> two () }end{"}
    ]
    assert load_template(str(path)).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_user_template_with_per_passage_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "turns.toml",
        """
        [[messages]]
        role = "user"
        content = "Query: {query}"

        [[messages]]
        role = "user"
        for_each_passage = true
        content = "{{{id}}} {passage}"
        """,
    )
    messages = render_window(load_template(path), "q", [("a", None), ("b", "B")])
    assert [m["content"] for m in messages] == ["Query: q", "{1} a", "{2} B: b"]


def test_unknown_placeholder_names_file_and_placeholder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad.toml",
        """
        [[messages]]
        role = "user"
        content = "{query} {passages} {documents}"
        """,
    )
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert str(path) in str(info.value)
    assert "unknown placeholder {documents}" in str(info.value)
    assert "messages[1]" in str(info.value)


def test_per_passage_field_outside_a_passage_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id.toml",
        """
        [[messages]]
        role = "user"
        content = "{query} {passages} {id}"
        """,
    )
    with pytest.raises(TemplateError, match=r"unknown placeholder \{id\}"):
        load_template(path)


def test_template_without_passages_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "nopassages.toml",
        """
        [[messages]]
        role = "user"
        content = "Rank the passages for {query}."
        """,
    )
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert str(path) in str(info.value)
    assert "never shows the passages" in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[messages]]\nrole = "user"\ncontent = "{query"\n', "malformed placeholder"),
        ("this is not toml [", "not a valid TOML template"),
        ('[[messages]]\nrole = "user"\n', "field 'messages.0.content'"),
        ('[[messages]]\nrole = "system"\ncontent = "{passages}"\n', "no user message"),
    ],
)
def test_broken_templates_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(TemplateError, match=message) as info:
        load_template(path)
    assert str(path) in str(info.value)


def test_unknown_template_name_lists_the_shipped_ones() -> None:
    with pytest.raises(TemplateError, match="no template 'rankxyz'.*rankgpt, rankzephyr"):
        load_template("rankxyz")


OFFLINE_PROBE = """
import socket, sys

def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
from permrank.core.tokens import default_tokenizer
from permrank.core.prompts import load_template, render_window
tok = default_tokenizer()
messages = render_window(load_template("rankgpt"), "fleas", [("x " * 500, None)] * 3)
print(tok.name, tok.count("hello world"), len(messages))
"""


def test_token_counting_works_with_no_network(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-cache")  # no cached BPE file to fall on
    env.pop("DATA_GYM_CACHE_DIR", None)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cl100k_base", "2", str(4 + 2 * 3)]
