"""Rerank one TREC DL19 query against a running simulator (or any OpenAI-compatible endpoint).

    permrank simulate --data ../shared/data/trec-dl19 --port 8000 &
    python examples/quickstart.py http://127.0.0.1:8000/v1

The base URL comes from the first argument, else $PERMRANK_BASE_URL, else the simulator's
default address. The simulator knows DL19's queries and passages by their text, so the query
and passages below are DL19's own (first sentences are enough).
"""

import os
import sys

from permrank import Reranker

base_url = (sys.argv[1:] or [os.environ.get("PERMRANK_BASE_URL", "http://127.0.0.1:8000/v1")])[0]
query = "how long is life cycle of flea"
passages = [
    "Fleas have a complex, 4-stage life cycle. Control of fleas on your pet and in your home "
    "must address all stages of this life cycle to stop the problem.",
    "tips on the life cycle of ticks how they attach to your dog and how they reproduce on your "
    "dog in this free online video series part of the video series.",
    "Flea Pupa. The flea larvae spin cocoons around themselves in which they move to the last "
    "phase of the flea life cycle and become adult fleas.",
    "The life cycle of a flea can last anywhere from 20 days to an entire year.",
    "After about 2 days (range 2-21 days), depending on environmental conditions, the flea egg "
    "hatches to release a first stage flea larva.",
]

with Reranker("permrank-simulator", base_url) as reranker:
    ranking = reranker.rank(query, passages)

for place, candidate in enumerate(ranking.candidates, start=1):
    was = passages.index(candidate.text) + 1
    print(f"{place}. (was {was}) {candidate.text[:72]}")
usage = ranking.usage
print(
    f"cost: {usage.calls} model call(s), {usage.cached_calls} answered from a cache, "
    f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
)
