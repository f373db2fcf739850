"""One way to make a cache key, and the keys of caches written before stay the same."""

from __future__ import annotations

import hashlib
import json

from permrank.backends.cache import answer_key, cache_key, request_key


def canonical_sha256(material: dict) -> str:
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def test_a_window_key_is_the_digest_of_everything_that_decides_the_answer() -> None:
    messages = [{"role": "user", "content": "rank [1] [2] — ü"}]
    key = cache_key(
        "http://h/v1", "m", messages, max_tokens=8, temperature=0.0, seed=None, extra=None
    )
    material = {
        "endpoint": "http://h/v1",
        "model": "m",
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0.0,
        "seed": None,
        "extra": {},
    }
    assert key == canonical_sha256(material) == answer_key(material)
    other = cache_key(
        "http://h/v1", "m", messages, max_tokens=8, temperature=0.0, seed=1, extra=None
    )
    assert other != key


def test_a_raw_request_key_is_the_same_digest_with_its_kind() -> None:
    body = {"b": 1, "a": [1, 2]}
    key = request_key("http://h/v1", "m", "/completions", body)
    material = {"endpoint": "http://h/v1", "model": "m", "route": "/completions", "body": body}
    assert key == "request:" + canonical_sha256(material)
    assert key == request_key("http://h/v1", "m", "/completions", {"a": [1, 2], "b": 1})
