"""`--method score` for real: vLLM's CPU build serving SmolLM2 as a scorer.

The causal LM becomes a sequence-classification model the way vLLM serves Qwen3-Reranker:
`--hf-overrides` names the architecture `LlamaForSequenceClassification` (vLLM converts the
causal LM) and builds the one-logit head from the LM head's rows for the tokens "no" and "yes"
(`method: from_2_way_softmax`: the score is P(yes) = softmax(yes, no)), and `--chat-template`
(tests/data/yes_no_reranker.jinja) frames the query and the document as a yes/no question.
vLLM then serves `/v1/rerank` and `/v1/score`. SmolLM2-135M was never trained as a reranker,
so its head's quality is not asserted (see docs/service.md for what was measured): the
rankings must be permutations, every passage scored, every request counted, and the scores the
server's.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from permrank.cli.main import main
from permrank.runs.io import read_requests

pytestmark = [pytest.mark.vllm, pytest.mark.server, pytest.mark.slow]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
MISSING = "vllm is not installed (install it with PERMRANK_EXTRAS=dev,vllm bash scripts/setup)"
if not HAVE_VLLM and not IN_CI:
    pytest.skip(MISSING, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "dl19-3q20"
TEMPLATE = ROOT / "tests" / "data" / "yes_no_reranker.jinja"
NAME = "smollm2-scorer"
AS_RERANKER = {
    "architectures": ["LlamaForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "method": "from_2_way_softmax",
}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not HAVE_VLLM:
        pytest.fail(f"CI=true but {MISSING}")
    from permrank.servers.convert import convert_gguf, default_model_dir, is_converted, smollm2_gguf
    from permrank.servers.vllm import VllmServer

    folder = default_model_dir()
    if not is_converted(folder):
        folder = convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("models") / "smollm2")
    server = VllmServer(
        folder,
        served_model_name=NAME,
        max_model_len=1024,
        extra_args=["--hf-overrides", json.dumps(AS_RERANKER), "--chat-template", str(TEMPLATE)],
    )
    with server:
        yield server.base_url


def rerank(tmp_path: Path, base_url: str, *flags: str) -> tuple[list[dict], dict]:
    output = tmp_path / "out.jsonl"
    code = main(
        ["rerank", "--input", str(FIXTURE / "candidates.jsonl"), "--output", str(output)]
        + ["--base-url", base_url, "--model", NAME, "--method", "score", "--no-cache", "-q"]
        + ["--overwrite", "--max-passage-tokens", "160", *flags]
    )
    assert code == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    return lines, json.loads(Path(f"{output}.manifest.json").read_text())


@pytest.mark.parametrize("api", ["auto", "rerank", "score"])
def test_vllm_scores_rerank_every_query(scorer: str, tmp_path: Path, api: str) -> None:
    lines, manifest = rerank(tmp_path, scorer, "--score-api", api, "--score-batch", "8")
    requests = list(read_requests(str(FIXTURE / "candidates.jsonl")))
    for line, request in zip(lines, requests, strict=True):
        docids = [c["docid"] for c in line["candidates"]]
        assert sorted(docids) == sorted(c.docid for c in request.candidates)
    # 20 passages in batches of 8: 3 requests a query, each one counted with its tokens.
    assert manifest["totals"]["calls"] == 3 * len(requests)
    assert manifest["totals"]["prompt_tokens"] > 20 * len(requests) * 10
    resolved = manifest["parameters"]["method"]["resolved_api"]
    assert resolved == ("rerank" if api == "auto" else api)


def test_scores_are_the_heads(scorer: str) -> None:
    """The order is the server's own scores, highest first (P(yes) in (0, 1))."""
    from permrank.engine.methods.score import relevance_scores
    from permrank.engine.reranker import Reranker

    request = next(iter(read_requests(str(FIXTURE / "candidates.jsonl"))))
    # Short passages without brackets: sent as they are (no cut, nothing escaped).
    texts = [
        " ".join(c.text.replace("[", "(").replace("]", ")").split())[:200]
        for c in request.candidates[:8]
    ]
    with Reranker(NAME, scorer, method="score", max_passage_tokens=160) as reranker:
        ranking = reranker.rank(request.query.text, texts)
    served = httpx.post(
        f"{scorer}/score",
        json={"model": NAME, "text_1": request.query.text, "text_2": texts},
        timeout=120,
    ).json()["data"]
    by_index = {d["index"]: d["score"] for d in served}
    scores = relevance_scores(ranking, model_scores=True)
    assert all(0.0 < s < 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    expected = sorted(by_index, key=lambda i: (-by_index[i], i))
    assert [int(d) for d in ranking.docids] == expected
