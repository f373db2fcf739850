"""The same query ranked by three scoring methods (against the simulator, or a real endpoint).

    permrank simulate --data ../shared/data/trec-dl19 --port 8000 &
    python examples/methods.py http://127.0.0.1:8000/v1

listwise asks for a permutation of a window; pointwise reads P(yes) from the logprobs of a
"does the passage answer the query?" question, one call per passage; pairwise (PRP) compares
passages two at a time, both ways round. Scoring methods need an endpoint that returns logprobs.
"""

import os
import sys

from permrank import Reranker

base_url = (sys.argv[1:] or [os.environ.get("PERMRANK_BASE_URL", "http://127.0.0.1:8000/v1")])[0]
query = "how long is life cycle of flea"
passages = [
    "Fleas have a complex, 4-stage life cycle. Control of fleas on your pet and in your home "
    "must address all stages of this life cycle to stop the problem.",
    "Flea Pupa. The flea larvae spin cocoons around themselves in which they move to the last "
    "phase of the flea life cycle and become adult fleas.",
    "The life cycle of a flea can last anywhere from 20 days to an entire year.",
    "After about 2 days (range 2-21 days), depending on environmental conditions, the flea egg "
    "hatches to release a first stage flea larva.",
]

for method in ("listwise", "pointwise", "pairwise"):
    with Reranker("permrank-simulator", base_url, method=method) as reranker:
        ranking = reranker.rank(query, passages)
    order = [passages.index(c.text) + 1 for c in ranking.candidates]
    print(f"{method:<9} order {order}  ({ranking.usage.calls} model calls)")
