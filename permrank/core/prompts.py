"""Prompt templates as data files, rendered to chat messages within a token budget.

A template is a TOML file (see ``prompts/rankgpt.toml`` and ``prompts/rankzephyr.toml``): a list
of ``[[messages]]`` with a ``role`` and a ``content``. A message with ``for_each_passage = true`` is
repeated for each passage (consecutive ones repeat as a group, as RankGPT's user/assistant turns
do); otherwise a ``{passages}`` placeholder takes every passage, each rendered with the
template's ``passage`` pattern and joined by ``passage_separator``.

Placeholders: ``{query}``, ``{num}`` (passages in the window), ``{passages}``; inside a passage
pattern or a per-passage message also ``{id}``, ``{passage}`` (title and text) and ``{text}``,
``{title}``. Literal braces are written ``{{`` and ``}}``. Anything else is refused when the
template is loaded, with the file and the placeholder named.
"""

from __future__ import annotations

import hashlib
import re
import string
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, PrivateAttr, ValidationError

from permrank.core.errors import TemplateError
from permrank.core.tokens import Tokenizer, default_tokenizer, memo_by_bytes

TEMPLATE_FIELDS = {"query", "num", "passages"}
PASSAGE_FIELDS = {"query", "num", "id", "passage", "text", "title"}
MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template adds around each message (role markers); counted in budgets."""
EDGE_MARGIN_TOKENS = 2
"""Tokens a passage may add at its two edges when joined to the template's text (BPE merges)."""


_IDENTIFIER = re.compile(r"[\[【［〔]\s*(\d{1,4})\s*[\]】］〕]")
_CONTROL = re.compile(
    r"<\|[^<>|\n]{0,64}\|>"  # <|im_end|>, <|eot_id|>, <|start_header_id|> ...
    r"|</?\s*(?:think|thinking|s|im_start|im_end|start_of_turn|end_of_turn)\s*>"
    r"|\[/?INST\]|<</?SYS>>",
    re.IGNORECASE,
)
_LOOKALIKE = str.maketrans({"<": "‹", ">": "›", "[": "⟦", "]": "⟧"})


@memo_by_bytes
def as_data(text: str) -> str:
    """A passage or query as shown to the model: data that cannot pass for prompt structure.

    Whitespace runs become one space, so a passage stays on its line (as RankGPT and rank_llm
    show passages) and cannot start a fake turn ("\\nAssistant: ...") or a fake passage. A
    bracketed number ``[3]`` becomes ``(3)`` (as rank_llm does), so a passage cannot hold an
    identifier, and a model quoting it cannot put a ranking in its answer. Special tokens and
    think tags (``<|im_end|>``, ``<|eot_id|>``, ``</think>``, ``[INST]``) get look-alike brackets,
    so no tokenizer reads them as control tokens and the parser never sees a ``</think>``.
    """
    text = " ".join(text.split())
    text = _IDENTIFIER.sub(r"(\1)", text)
    return _CONTROL.sub(lambda m: m.group(0).translate(_LOOKALIKE), text)


class TemplateMessage(BaseModel):
    role: str
    content: str
    for_each_passage: bool = False


class Template(BaseModel):
    name: str
    description: str = ""
    messages: list[TemplateMessage]
    passage: str = "[{id}] {passage}"
    passage_separator: str = "\n"
    source: str = ""
    sha256: str = ""
    _token_counts: dict[tuple[int, object], tuple[int, ...]] = PrivateAttr(default_factory=dict)
    """Token counts of the template with empty passages (see ``_template_tokens``)."""

    def render(self, query: str, passages: list[tuple[str, str | None]]) -> list[dict[str, str]]:
        """Messages for one window: ``passages`` are (text, title) pairs, identifier 1 first.

        The query and the passages are inserted as data (see ``as_data``)."""
        num = len(passages)
        query = as_data(query)
        passages = [(as_data(text), as_data(title) if title else title) for text, title in passages]

        def one(pattern: str, i: int, text: str, title: str | None) -> str:
            return pattern.format(
                query=query,
                num=num,
                id=i,
                passage=f"{title}: {text}" if title else text,
                text=text,
                title=title or "",
            )

        block = self.passage_separator.join(
            one(self.passage, i, text, title) for i, (text, title) in enumerate(passages, 1)
        )
        out: list[dict[str, str]] = []
        k = 0
        while k < len(self.messages):
            if not self.messages[k].for_each_passage:
                msg = self.messages[k]
                out.append(
                    {
                        "role": msg.role,
                        "content": msg.content.format(query=query, num=num, passages=block),
                    }
                )
                k += 1
                continue
            group_end = k
            while group_end < len(self.messages) and self.messages[group_end].for_each_passage:
                group_end += 1
            for i, (text, title) in enumerate(passages, 1):
                for msg in self.messages[k:group_end]:
                    out.append({"role": msg.role, "content": one(msg.content, i, text, title)})
            k = group_end
        return out


def _fields(pattern: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}


def _validate(template: Template, where: str) -> None:
    takes_passages = False
    patterns = [("passage", template.passage, PASSAGE_FIELDS)]
    for i, msg in enumerate(template.messages, 1):
        allowed = PASSAGE_FIELDS if msg.for_each_passage else TEMPLATE_FIELDS
        patterns.append((f"messages[{i}]", msg.content, allowed))
    for label, pattern, allowed in patterns:
        try:
            names = _fields(pattern)
        except ValueError as exc:
            raise TemplateError(
                f"{where}: {label}: malformed placeholder ({exc}); write literal braces as "
                "{{ and }}"
            ) from None
        unknown = sorted(n for n in names if n not in allowed)
        if unknown:
            raise TemplateError(
                f"{where}: {label}: unknown placeholder {{{unknown[0]}}}; a template may use "
                f"{', '.join('{' + f + '}' for f in sorted(allowed))} here"
            )
        if label != "passage" and (
            "passages" in names or ({"passage", "text"} & names and pattern is not template.passage)
        ):
            takes_passages = True
    if not takes_passages:
        raise TemplateError(
            f"{where}: the template never shows the passages: put {{passages}} in a message, "
            "or add messages with for_each_passage = true that use {passage}"
        )
    if not any(m.role == "user" for m in template.messages):
        raise TemplateError(f"{where}: the template has no user message")


def builtin_templates() -> dict[str, Path]:
    """Names of the templates shipped with permrank, and their files."""
    found: dict[str, Path] = {}
    candidates = [Path(__file__).resolve().parents[2] / "prompts"]
    try:
        candidates.insert(0, Path(str(resources.files("permrank") / "_prompts")))
    except (ModuleNotFoundError, TypeError):
        pass
    for folder in candidates:
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def load_template(name_or_path: str | Path) -> Template:
    """A shipped template by name (``rankgpt``, ``rankzephyr``) or a user's TOML file by path."""
    builtins = builtin_templates()
    path = builtins.get(str(name_or_path))
    if path is None:
        path = Path(name_or_path)
        if not path.is_file():
            raise TemplateError(
                f"no template {str(name_or_path)!r}: not a shipped template "
                f"({', '.join(sorted(builtins))}) and no such file"
            )
    data = path.read_bytes()
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: not a valid TOML template: {exc}") from None
    raw.setdefault("name", path.stem)
    try:
        template = Template(**raw, source=str(path), sha256=hashlib.sha256(data).hexdigest())
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise TemplateError(f"{path}: field {field!r}: {first['msg']}") from None
    _validate(template, str(path))
    return template


@dataclass
class PromptBudget:
    """How much of a prompt passages may take."""

    max_passage_tokens: int = 300
    """Each passage is cut to this many tokens."""
    context_window: int = 8192
    """The model's context; the rendered prompt plus the answer must fit in it."""
    max_query_tokens: int = 256


def answer_tokens(num: int, tokenizer: Tokenizer | None = None) -> int:
    """A ``max_tokens`` that fits a full answer for ``num`` passages, with a margin."""
    tokenizer = tokenizer or default_tokenizer()
    ideal = " > ".join(f"[{i}]" for i in range(num, 0, -1))
    return int(tokenizer.count(ideal) * 1.25) + 16


def count_message_tokens(messages: list[dict[str, str]], tokenizer: Tokenizer) -> int:
    return sum(tokenizer.count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def _field_uses(template: Template, num: int) -> tuple[int, int, int]:
    """How many times one passage's text, its title, and the query appear in a rendered window
    of ``num`` passages."""
    texts = titles = queries = 0
    passage_fields = _field_list(template.passage)
    for msg in template.messages:
        fields = _field_list(msg.content)
        if msg.for_each_passage:
            patterns = [fields]
            queries += num * fields.count("query")
        else:
            patterns = [passage_fields] * fields.count("passages")
            queries += fields.count("query") + num * len(patterns) * passage_fields.count("query")
        for names in patterns:
            texts += names.count("passage") + names.count("text")
            titles += names.count("passage") + names.count("title")
    return texts, titles, queries


def _field_list(pattern: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


def _template_tokens(template: Template, num: int, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The window's tokens with the query and every passage empty, and how often a passage's
    text, its title and the query appear in it: counted once per template, window length and
    tokenizer (so once per run for each window length, whatever the query)."""
    key = (num, tokenizer)
    found = template._token_counts.get(key)
    if found is None:
        if len(template._token_counts) >= 4096:
            template._token_counts.clear()
        empty = count_message_tokens(template.render("", [("", None)] * num), tokenizer)
        found = template._token_counts[key] = (empty, *_field_uses(template, num))
    return found


def _bytes_within(text: str, limit: int) -> int | None:
    """The UTF-8 length of ``text`` if it is at most ``limit``, else None (cheap check first)."""
    if len(text) > limit:
        return None
    size = len(text.encode("utf-8"))
    return size if size <= limit else None


def bounded_by_bytes(tokenizer: Tokenizer) -> bool:
    """True when the tokenizer never counts more tokens than a text has UTF-8 bytes (a byte-level
    BPE such as tiktoken's): then a short text needs no counting at all."""
    return bool(getattr(tokenizer, "at_most_one_token_per_byte", False))


def _query_tokens(query: str, uses: int, tokenizer: Tokenizer) -> int:
    return uses * (tokenizer.count(as_data(query)) + EDGE_MARGIN_TOKENS) if uses else 0


def estimate_window_tokens(
    template: Template,
    query: str,
    passages: list[tuple[str, str | None]],
    tokenizer: Tokenizer,
    *,
    bytes_up_to: int = 0,
) -> int:
    """An upper bound of ``count_message_tokens`` of the rendered window, without rendering it.

    The template with an empty query and empty passages is counted once per template and window
    length; the query and each passage's shown text (``as_data``) are counted on their own (a
    caching tokenizer counts each once across the windows it appears in), plus
    ``EDGE_MARGIN_TOKENS`` at each appearance for the tokens its edges may merge into or split
    from the template's text. With ``bytes_up_to`` and a tokenizer bounded by bytes, a text of
    at most that many UTF-8 bytes is not counted: its length in bytes bounds its tokens.
    """
    overhead, text_uses, title_uses, query_uses = _template_tokens(
        template, len(passages), tokenizer
    )
    if not bounded_by_bytes(tokenizer):
        bytes_up_to = 0

    def tokens(text: str) -> int:
        text = as_data(text)
        size = _bytes_within(text, bytes_up_to) if bytes_up_to else None
        return size if size is not None else tokenizer.count(text)

    total = overhead + _query_tokens(query, query_uses, tokenizer)
    for text, title in passages:
        total += text_uses * (tokens(text) + EDGE_MARGIN_TOKENS)
        if title:
            # "{title}: {text}": the title, the colon and space, one more edge.
            total += title_uses * (tokens(title) + 1 + EDGE_MARGIN_TOKENS)
    return total


def render_window(
    template: Template,
    query: str,
    passages: list[tuple[str, str | None]],
    *,
    budget: PromptBudget | None = None,
    tokenizer: Tokenizer | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, str]]:
    """Render one window, passages cut to the budget, the whole fitted to the context.

    Each passage is cut to ``max_passage_tokens``; if the prompt and ``max_tokens`` of answer
    still exceed the context, every passage is cut to an equal share of what is left.
    A window is measured by ``estimate_window_tokens`` (template counted once, passages one by
    one); only a window whose estimate exceeds the room is counted exactly, whole.
    """
    budget = budget or PromptBudget()
    tokenizer = tokenizer or default_tokenizer()
    max_tokens = max_tokens if max_tokens is not None else answer_tokens(len(passages), tokenizer)
    query = tokenizer.truncate(query, budget.max_query_tokens)

    by_bytes = bounded_by_bytes(tokenizer)

    def shown(text: str, limit: int) -> str:
        """``text`` as shown (``as_data``) and cut to ``limit`` tokens; one count if not cut
        (none when its bytes already fit, for a tokenizer bounded by bytes)."""
        text = as_data(text)
        if by_bytes and _bytes_within(text, limit) is not None:
            return text
        if tokenizer.count(text) <= limit:
            return text
        return as_data(tokenizer.truncate(text, limit))

    def cut(limit: int) -> list[tuple[str, str | None]]:
        """Each passage to ``limit`` tokens, title included (a title takes at most half)."""
        out = []
        for text, title in passages:
            if title:
                title = shown(title, limit // 2)
                text = shown(text, max(0, limit - tokenizer.count(title)))
            else:
                text = shown(text, limit)
            out.append((text, title))
        return out

    def fits(shown: list[tuple[str, str | None]]) -> list[dict[str, str]] | None:
        # Cheapest first: short texts bounded by their bytes (the others were counted by
        # ``cut``), then every text counted, then the whole rendered window counted.
        if by_bytes:
            bound = estimate_window_tokens(
                template, query, shown, tokenizer, bytes_up_to=budget.max_passage_tokens
            )
            if bound <= available:
                return template.render(query, shown)
        if estimate_window_tokens(template, query, shown, tokenizer) <= available:
            return template.render(query, shown)
        messages = template.render(query, shown)
        return messages if count_message_tokens(messages, tokenizer) <= available else None

    available = budget.context_window - max_tokens
    messages = fits(cut(budget.max_passage_tokens))
    if messages is not None:
        return messages
    overhead, _, _, query_uses = _template_tokens(template, len(passages), tokenizer)
    overhead += _query_tokens(query, query_uses, tokenizer)
    share = min((available - overhead) // max(1, len(passages)), budget.max_passage_tokens)
    # Token counts are not additive across cuts at the edges: trim until it fits.
    while share >= 8:
        messages = fits(cut(share))
        if messages is not None:
            return messages
        share -= max(1, share // 10)
    raise TemplateError(
        f"a window of {len(passages)} passages does not fit a context of "
        f"{budget.context_window} tokens with template {template.name!r} (the template "
        f"alone takes {overhead} tokens and the answer {max_tokens}); use a smaller "
        "--window-size or a larger --context-window"
    )
