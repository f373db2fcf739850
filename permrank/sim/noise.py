"""How the simulated judge errs: seeded noise models over a window's true grades.

The simulator knows each shown passage's qrels grade. ``judge_order`` turns the grades of one
window into the judge's answer (positions, best first), erring as ``Noise`` says:

- ``swap`` P: each adjacent pair of the answer is swapped with probability P (front to back);
- ``bias`` B: position bias; a passage shown at the very first or the very last place looks B
  grades better than it is, one in the middle not at all (a U shape, quadratic in the distance
  from the middle), so windows favour their ends as real models do;
- ``miss`` P: each passage is left out of the answer with probability P (the parser then has to
  repair the answer);
- ``attention`` N: the judge reads only the first N passages of a window well; each later one is,
  with probability ``blur`` (0.5), given a random grade between 0 and the highest grade shown.

Each draw is seeded by ``seed`` and a key of the prompt (the simulator uses its SHA-256), so a
run is repeatable and the same window always gets the same answer. Ties keep the shown order.
On the command line the models are one spec string: ``swap:0.1,bias:0.5,miss:0.02,
attention:10,seed:3``; a bare number is the swap probability, as ``--noise 0.1`` always was.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from permrank.core.errors import ConfigError

NOISE_KEYS = ("swap", "bias", "miss", "attention", "blur", "seed")


@dataclass
class Noise:
    """How the simulated judge errs. Every draw is seeded by ``seed`` and the prompt's text."""

    swap: float = 0.0
    """Probability of swapping each adjacent pair of the true order (applied front to back)."""
    seed: int = 0
    bias: float = 0.0
    """Grades added to the first and last shown passages (less towards the middle)."""
    miss: float = 0.0
    """Probability that a passage is left out of the answer."""
    attention: int | None = None
    """Passages after the first ``attention`` are read poorly (see ``blur``)."""
    blur: float = 0.5
    """Probability that a passage beyond ``attention`` gets a random grade."""

    def __post_init__(self) -> None:
        for name in ("swap", "miss", "blur"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"noise {name} is a probability between 0 and 1 (got {value})")
        if self.bias < 0:
            raise ConfigError(f"noise bias is a number of grades >= 0 (got {self.bias})")
        if self.attention is not None and self.attention < 1:
            raise ConfigError(
                f"noise attention is how many leading passages are read well, >= 1 "
                f"(got {self.attention})"
            )

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_exact(self) -> bool:
        return not (self.swap or self.bias or self.miss or self.attention is not None)


def parse_noise(spec: str | float | None, seed: int = 0) -> Noise:
    """A ``Noise`` from ``"swap:0.1,bias:0.5"`` (or a bare swap probability like ``"0.1"``).

    ``seed`` is used unless the spec names its own.
    """
    if spec is None or spec == "":
        return Noise(seed=seed)
    if isinstance(spec, int | float):
        return Noise(swap=float(spec), seed=seed)
    try:
        return Noise(swap=float(spec), seed=seed)
    except ValueError:
        pass
    values: dict[str, Any] = {"seed": seed}
    for part in spec.split(","):
        key, sep, value = part.strip().partition(":")
        key = key.strip()
        if not sep or key not in NOISE_KEYS:
            raise ConfigError(
                f"noise spec {spec!r}: {part.strip()!r} is not KEY:VALUE with KEY one of "
                f"{', '.join(NOISE_KEYS)}; e.g. --noise swap:0.1,bias:0.5,miss:0.02,attention:10"
            )
        try:
            values[key] = int(value) if key in ("attention", "seed") else float(value)
        except ValueError:
            raise ConfigError(
                f"noise spec {spec!r}: {key} needs a number (got {value.strip()!r})"
            ) from None
    return Noise(**values)


def edge_weight(position: int, size: int) -> float:
    """1 at the first and the last place of a window of ``size``, 0 in the middle (a U)."""
    if size < 2:
        return 0.0
    middle = (size - 1) / 2
    return ((position - middle) / middle) ** 2


def perceived_grades(grades: list[int], noise: Noise, rng: random.Random) -> list[float]:
    """The grades as this judge reads them: position bias and limited attention applied."""
    seen = [float(g) for g in grades]
    if noise.attention is not None and len(grades) > noise.attention:
        top = max(grades)
        for i in range(noise.attention, len(grades)):
            if rng.random() < noise.blur:
                seen[i] = float(rng.randint(0, top))
    if noise.bias > 0:
        seen = [g + noise.bias * edge_weight(i, len(seen)) for i, g in enumerate(seen)]
    return seen


def judge_order(grades: list[int], noise: Noise, key: str) -> list[int]:
    """The judge's answer: positions 0..n-1 by perceived grade (ties keep shown order), then
    seeded adjacent swaps, then seeded omissions. Without noise, exactly the order by grade."""
    rng = random.Random(f"{noise.seed}:{key}")
    seen = perceived_grades(grades, noise, rng)
    order = sorted(range(len(grades)), key=lambda i: -seen[i])
    if noise.swap > 0:
        for i in range(len(order) - 1):
            if rng.random() < noise.swap:
                order[i], order[i + 1] = order[i + 1], order[i]
    if noise.miss > 0:
        order = [i for i in order if rng.random() >= noise.miss]
    return order
