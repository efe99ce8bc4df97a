"""Which scorers exist. Adding one: write the class in its own module, list it here.

Modules are imported by name so that a scorer module that fails to import is
reported as that scorer failing (and its refunds held), not as a dead worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

from scorers.base import Scorer, ScorerKind

# name -> (module, class, kind). The kind is repeated here so that a scorer that
# fails to import is still known to belong to the pool or to the event loop.
KNOWN_SCORERS: dict[str, tuple[str, str, ScorerKind]] = {
    "image.reference": ("scorers.image_reference", "ReferenceMatchScorer", "image"),
    "image.provenance": ("scorers.provenance", "ProvenanceScorer", "image"),
    "image.capture": ("scorers.capture", "CaptureScorer", "image"),
    # Scores matches looked up in state, so it runs with the behaviour scorers.
    "image.reuse": ("scorers.reuse", "EvidenceReuseScorer", "behaviour"),
    "behaviour.velocity": ("scorers.behaviour", "VelocityScorer", "behaviour"),
    "behaviour.account": ("scorers.behaviour", "AccountScorer", "behaviour"),
    "behaviour.amount": ("scorers.behaviour", "AmountScorer", "behaviour"),
    "behaviour.linked": ("scorers.behaviour", "LinkedAccountScorer", "behaviour"),
}


@dataclass(frozen=True)
class Unavailable:
    """A scorer that is enabled but could not be loaded: its refunds are held."""

    name: str
    kind: ScorerKind
    error: str


def load_scorers(
    enabled: Iterable[str] | None = None, disabled: Iterable[str] = (), kind: ScorerKind | None = None
) -> list[Scorer | Unavailable]:
    """Instantiate the enabled scorers (all known ones by default), optionally of one kind."""
    names = list(enabled) if enabled is not None else list(KNOWN_SCORERS)
    skip = set(disabled)
    unknown = [n for n in [*names, *skip] if n not in KNOWN_SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s): {', '.join(sorted(unknown))}; known: {', '.join(KNOWN_SCORERS)}")
    loaded: list[Scorer | Unavailable] = []
    for name in names:
        module_name, class_name, scorer_kind = KNOWN_SCORERS[name]
        if name in skip or (kind is not None and scorer_kind != kind):
            continue
        try:
            scorer = getattr(importlib.import_module(module_name), class_name)()
        except Exception as exc:  # an unloadable scorer holds refunds; it must not stop the worker
            loaded.append(Unavailable(name, scorer_kind, f"{type(exc).__name__}: {exc}"))
            continue
        if scorer.name != name or scorer.kind != scorer_kind:
            raise ValueError(f"{module_name}.{class_name} is {scorer.name!r}/{scorer.kind}, "
                             f"registered as {name!r}/{scorer_kind}")
        loaded.append(scorer)
    return loaded
