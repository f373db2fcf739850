"""The options shared by the commands that rerank (rerank, distill, demo, serve api): which
model and endpoint, windows and prompts, the scoring method, and the run (limit, depth, errors)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permrank.cli import scaleout
from permrank.core.errors import ConfigError
from permrank.core.strategies import STRATEGIES

# Heavy modules (aiohttp, pydantic models, ir_measures, tqdm) are imported where they are used,
# so that ``permrank --help`` and the other commands do not pay for them.
if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


METHOD_NAMES = ("listwise", "pointwise", "likelihood", "first", "pairwise", "score")

DEFAULT_CONTEXT_WINDOW = 8192
DEFAULT_TIMEOUT_S = 120.0
EMBEDDED_TIMEOUT_S = 900.0


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that say which model answers and how it is asked (shared by commands)."""
    g = parser.add_argument_group("model")
    scaleout.add_endpoint_options(g)
    g.add_argument(
        "--model",
        help="model name the endpoint serves; without --base-url a local model name "
        "(as --local-model)",
    )
    g.add_argument(
        "--backend",
        choices=("openai", "vllm"),
        default="openai",
        help="openai: an OpenAI-compatible endpoint (default); vllm: vLLM in this process, "
        "--model being a Hugging Face model folder (default: the converted SmolLM2), every "
        "window of a round in one generate call (needs the vllm extra)",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY); "
        "the key is never logged or written",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed sent with every request")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="answer budget per window (default: sized to a full permutation)",
    )
    g.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight, per endpoint (8)"
    )
    g.add_argument("--rps", type=float, default=None, help="requests per second at most")
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per request (120; 900 for the embedded model)",
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="retries of a failed request (429, 5xx, timeouts) before giving up (5)",
    )
    g.add_argument(
        "--transport",
        choices=("auto", "openai", "aiohttp", "plain"),
        default="auto",
        help="HTTP client: 'aiohttp' (or 'plain': aiohttp, a fraction of the SDK's CPU per "
        "request), 'openai' (the openai SDK), 'auto' (aiohttp for http:// without a proxy, "
        "else the SDK; the default)",
    )
    g.add_argument(
        "--max-response-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="the largest answer read from the endpoint; a larger one is an error (32 MiB)",
    )
    g.add_argument(
        "--cache",
        metavar="PATH",
        help="SQLite file of model answers, shared safely by several runs (default: "
        "$PERMRANK_CACHE_DIR/cache.sqlite, else ~/.cache/permrank/cache.sqlite)",
    )
    g.add_argument("--no-cache", action="store_true", help="ask the model every time")

    g = parser.add_argument_group("windows and prompts")
    g.add_argument(
        "--strategy",
        default="sliding",
        choices=sorted(STRATEGIES),
        help="how windows are planned and merged (sliding)",
    )
    g.add_argument("--window-size", type=int, default=20, help="passages per window (20)")
    g.add_argument("--step", type=int, default=None, help="sliding: how far the window moves (10)")
    g.add_argument("--passes", type=int, default=None, help="sliding: passes (1)")
    g.add_argument(
        "--early-stop",
        action="store_true",
        default=None,
        help="sliding: stop the passes when one leaves the top unchanged",
    )
    g.add_argument(
        "--top-n",
        type=int,
        default=None,
        metavar="N",
        help="places guaranteed at the top: tournament and tdpart put the true top N of a "
        "perfect judge first; --method pairwise (sliding, heap) sorts the first N (10)",
    )
    g.add_argument(
        "--shuffles",
        type=int,
        default=None,
        help="selfconsistency: orders each window is asked in (3)",
    )
    g.add_argument(
        "--aggregate",
        choices=("borda", "kemeny"),
        default=None,
        help="selfconsistency: how the shuffled answers are combined (borda)",
    )
    g.add_argument(
        "--inner",
        choices=sorted(set(STRATEGIES) - {"selfconsistency"}),
        default=None,
        help="selfconsistency: the strategy whose windows are shuffled (sliding)",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="rerank only the first K candidates of each query; the others follow them in "
        "their input order. Compare --depth, which drops them (default: all)",
    )
    g.add_argument(
        "--prompt",
        default="rankgpt",
        help="template: rankgpt, rankzephyr, or a path to a TOML template",
    )
    g.add_argument(
        "--max-passage-tokens",
        type=int,
        default=None,
        help="each passage is cut to this many tokens (300; a named local model's measured "
        "cut when its method is used)",
    )
    g.add_argument(
        "--context-window",
        type=int,
        default=None,
        help="the model's context in tokens; prompts are fitted to it "
        f"(default: what the server reports, else {DEFAULT_CONTEXT_WINDOW})",
    )
    g.add_argument(
        "--tokenizer",
        choices=("auto", "server", "tiktoken"),
        default="auto",
        help="token counts for budgets: the served model's own /tokenize (llama.cpp, vLLM) or "
        "tiktoken's cl100k_base (auto: the server's when it has one)",
    )
    g.add_argument(
        "--constrain",
        choices=("grammar", "regex", "json", "auto"),
        default=None,
        help="force answers into the [i] > [j] shape: a GBNF grammar (llama.cpp), a regex "
        "(vLLM structured outputs) or a JSON schema (OpenAI-style); auto picks by server",
    )

    g = parser.add_argument_group("embedded model (used when there is no --base-url)")
    g.add_argument(
        "--local-model",
        metavar="NAME|PATH.gguf",
        help="model of the embedded llama.cpp server: qwen2.5-coder-0.5b (default), "
        "qwen2.5-coder-1.5b, smollm2-135m (see `permrank models list`) or a GGUF file",
    )
    g.add_argument(
        "--local-parallel",
        type=int,
        default=None,
        help="requests the embedded server works on at once (llama.cpp slots; 1, or what the "
        "named model's measured method uses)",
    )
    g.add_argument(
        "--local-ctx",
        type=int,
        default=None,
        help="context per window of the embedded server in tokens (4096, or what the named "
        "model's measured method uses: 1024 for the Qwen models' query likelihood)",
    )

    g = parser.add_argument_group("scoring method")
    g.add_argument(
        "--method",
        default=None,
        choices=METHOD_NAMES,  # engine.methods.METHOD_NAMES (a test keeps them equal)
        help="listwise (generated permutations; the default for --base-url endpoints; a named "
        "local model uses the method measured best for it), pointwise (yes/no logprobs), "
        "likelihood (query likelihood, UPR), first (listwise from the first token's logprobs), "
        "pairwise (A-or-B comparisons, PRP), score (a learned head's scores through the "
        "endpoint's rerank API)",
    )
    g.add_argument(
        "--yes-score",
        choices=("softmax", "logprob", "vocab"),
        help="pointwise: softmax over yes/no (default), the yes logprob, or P(yes) over the vocab",
    )
    g.add_argument(
        "--interpolate",
        type=float,
        metavar="W",
        help="pointwise, likelihood: order by W * model + (1 - W) * first stage, both scores "
        "min-max normalised per query (0-1; a named local model's recipe sets its own, which "
        "this replaces)",
    )
    g.add_argument(
        "--likelihood-mode",
        choices=("auto", "echo", "prompt_logprobs", "forced"),
        help="likelihood: how prompt logprobs are read (auto: echo, else llama.cpp's forced "
        "token grammar; prompt_logprobs: vLLM)",
    )
    g.add_argument(
        "--pairwise",
        choices=("allpairs", "sliding", "heap"),
        help="pairwise: how comparisons are chosen and merged (heap)",
    )
    g.add_argument(
        "--pairwise-k",
        type=int,
        dest="pairwise_k",
        help="the same as --top-n for --method pairwise (older name)",
    )
    g.add_argument(
        "--top-logprobs",
        type=int,
        help="alternatives asked per answer token (pointwise/first 20, pairwise 5)",
    )
    g.add_argument(
        "--route",
        choices=("chat", "completions"),
        help="pointwise/first/pairwise: ask /chat/completions (default) or /completions "
        "(base models)",
    )
    g.add_argument(
        "--score-api",
        choices=("auto", "rerank", "tei", "score"),
        help="score: the endpoint's API for a learned relevance head: rerank (Cohere/Jina/vLLM "
        "/v1/rerank), tei (TEI /rerank), score (vLLM /score); auto finds what it serves",
    )
    g.add_argument("--score-batch", type=int, help="score: passages per rerank/score request (32)")


def add_run_options(
    parser: argparse.ArgumentParser, *, limit_help: str, skip_help: str, overwrite_help: str
) -> None:
    """``--limit``, ``--depth``, ``--on-error``, ``--overwrite`` and ``--quiet`` of a command
    that reranks a file of queries; ``skip_help`` says what becomes of a failed query with
    ``--on-error skip``, ``overwrite_help`` what starting afresh removes and what a rerun keeps."""
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="N",
        help="read only the first N candidates of each query; the others are dropped (not in "
        "the output). Compare --top-k, which keeps them (default: all)",
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a query that fails after retries stops the run (fail, default) or is "
        f"{skip_help} (skip)",
    )
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


METHOD_FLAGS = {
    "yes_score": "normalisation",
    "likelihood_mode": "mode",
    "pairwise": "aggregation",
    "pairwise_k": "k",
    "top_logprobs": "top_logprobs",
    "route": "route",
    "score_api": "api",
    "score_batch": "batch",
    "interpolate": "interpolate",
}


def method_options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring-method options given on the command line (a flag the method does not take
    is refused, naming the flag)."""
    from permrank.engine.methods import METHODS

    fields = getattr(METHODS.get(args.method), "__dataclass_fields__", {})
    options = dict(getattr(args, "recipe_options", None) or {})
    top_n, pairwise_k = getattr(args, "top_n", None), getattr(args, "pairwise_k", None)
    if args.method == "pairwise" and top_n is not None:  # one word: places at the top
        if pairwise_k is not None and pairwise_k != top_n:
            raise ConfigError(
                f"--top-n {top_n} and --pairwise-k {pairwise_k} name the same thing "
                "(places sorted at the top); give one"
            )
        pairwise_k = top_n
    for flag, option in METHOD_FLAGS.items():
        value = pairwise_k if flag == "pairwise_k" else getattr(args, flag, None)
        if value is None:
            continue
        if option == "k" and "top_n" in fields:  # the method's newer name for it
            option = "top_n"
        if option not in fields:
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to --method {args.method}"
            )
        options[option] = value
        choice = getattr(args, "method_choice", None)
        if isinstance(choice, dict) and option in choice.get("options", {}):
            choice.setdefault("replaced_by_flags", {})[option] = value  # the manifest says so
    return options


def cache_path_of(args: argparse.Namespace) -> Path | None:
    """The response cache the flags ask for (``--cache PATH``, ``--no-cache``, or the default)."""
    from permrank.backends.cache import default_cache_path

    if getattr(args, "no_cache", False):
        return None
    path = getattr(args, "cache", None)
    return Path(path) if path else default_cache_path()
