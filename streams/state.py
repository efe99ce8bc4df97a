"""What the service remembers, as plain functions over JSON values kept in Faust tables.

Three tables (see README, "State"):

- ``buyers`` (partitioned by buyer_id, like the decide stage): each buyer's recent
  claims and verdicts. Bounded: claims older than ``CLAIM_HORIZON`` before the
  buyer's newest claim are dropped, and at most ``MAX_CLAIMS`` are kept.
- ``taints`` (global): fingerprint -> the fraud verdict that tainted it.
- ``evidence_index`` (global): LSH band of an evidence fingerprint -> the claims
  whose evidence had it.

Everything is measured in event time (``requested_at``, the outcome's
``decided_at``): a claim only ever sees claims, verdicts and evidence from
strictly earlier event time, and never itself, so a redelivered or replayed
request gets the same features.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from scorers.base import BuyerFeatures, EvidenceMatch, FraudLink

CLAIM_HORIZON = timedelta(days=90)
MAX_CLAIMS = 200
MAX_VERDICTS = 100
MAX_INDEX_ENTRIES_PER_BAND = 64

BuyerState = dict[str, Any]


def empty_buyer() -> BuyerState:
    return {"claims": [], "verdicts": []}


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def record_claim(
    state: BuyerState | None,
    *,
    refund_id: str,
    order_id: str,
    requested_at: datetime,
    merchant_id: str,
    amount: Decimal,
    currency: str,
    kind: str,
    fingerprints: Mapping[str, str],
) -> BuyerState:
    """Add a claim (idempotent on refund_id) and drop what fell out of the horizon."""
    state = {"claims": list((state or {}).get("claims", [])), "verdicts": list((state or {}).get("verdicts", []))}
    claims = [c for c in state["claims"] if c["r"] != refund_id]
    claims.append({
        "r": refund_id, "o": order_id, "t": requested_at.isoformat(), "m": merchant_id,
        "a": str(amount), "c": currency, "k": kind, "fp": dict(fingerprints),
    })
    claims.sort(key=lambda c: (c["t"], c["r"]))
    newest = _ts(claims[-1]["t"])
    claims = [c for c in claims if newest - _ts(c["t"]) <= CLAIM_HORIZON][-MAX_CLAIMS:]
    state["claims"] = claims
    return state


def record_verdict(state: BuyerState | None, *, refund_id: str, verdict: str, decided_at: datetime) -> BuyerState:
    state = {"claims": list((state or {}).get("claims", [])), "verdicts": list((state or {}).get("verdicts", []))}
    verdicts = [v for v in state["verdicts"] if v["r"] != refund_id]
    verdicts.append({"r": refund_id, "v": verdict, "t": decided_at.isoformat()})
    verdicts.sort(key=lambda v: (v["t"], v["r"]))
    state["verdicts"] = verdicts[-MAX_VERDICTS:]
    return state


def claim_fingerprints(state: BuyerState | None, refund_id: str) -> dict[str, str] | None:
    for claim in (state or {}).get("claims", []):
        if claim["r"] == refund_id:
            return dict(claim["fp"])
    return None


def buyer_features(
    state: BuyerState | None,
    *,
    refund_id: str,
    requested_at: datetime,
    currency: str,
    tainted_links: tuple[FraudLink, ...] = (),
    evidence_matches: tuple[EvidenceMatch, ...] = (),
) -> BuyerFeatures:
    earlier = [
        c for c in (state or {}).get("claims", [])
        if c["r"] != refund_id and _ts(c["t"]) < requested_at
    ]

    def within(days: float) -> list[dict[str, Any]]:
        since = requested_at - timedelta(days=days)
        return [c for c in earlier if _ts(c["t"]) >= since and c["k"] == "refund_only"]

    month = within(30)
    amounts = [Decimal(c["a"]) for c in earlier if c["c"] == currency]
    verdicts = [v for v in (state or {}).get("verdicts", []) if _ts(v["t"]) < requested_at]
    return BuyerFeatures(
        claims_24h=len(within(1)),
        claims_7d=len(within(7)),
        claims_10d=len(within(10)),
        claims_30d=len(month),
        distinct_merchants_30d=len({c["m"] for c in month}),
        refund_only_claims_30d=len(month),
        amount_history_count=len(amounts),
        amount_history_median=statistics.median(amounts) if amounts else None,
        legitimate_verdicts=sum(v["v"] == "legitimate" for v in verdicts),
        fraud_verdicts=sum(v["v"] == "fraud" for v in verdicts),
        tainted_links=tainted_links,
        evidence_matches=evidence_matches,
    )


# ------------------------------------------------------------------ taints


def taint_key(kind: str, fingerprint: str) -> str:
    return f"{kind}:{fingerprint}"


def taint_value(*, refund_id: str, buyer_id: str, decided_at: datetime) -> dict[str, str]:
    return {"r": refund_id, "b": buyer_id, "t": decided_at.isoformat()}


def merge_taint(existing: dict[str, str] | None, new: dict[str, str]) -> dict[str, str]:
    """Keep the earliest confirmation: the one a reviewer should be pointed to."""
    if existing is None or (new["t"], new["r"]) < (existing["t"], existing["r"]):
        return new
    return existing


def links_for(
    fingerprints: Mapping[str, str], requested_at: datetime, lookup: Callable[[str], dict[str, str] | None]
) -> tuple[FraudLink, ...]:
    links = []
    for kind, value in sorted(fingerprints.items()):
        taint = lookup(taint_key(kind, value))
        if taint is not None and _ts(taint["t"]) < requested_at:
            links.append(FraudLink(kind, value, taint["r"], taint["b"], _ts(taint["t"])))
    return tuple(links)


# ----------------------------------------------------------- evidence index


def index_entry(
    *, evidence_hash: int, refund_id: str, buyer_id: str, order_id: str, image_id: str, requested_at: datetime
) -> list[Any]:
    return [f"{evidence_hash:016x}", refund_id, buyer_id, order_id, image_id, requested_at.isoformat()]


def add_to_band(entries: list[list[Any]] | None, entry: list[Any]) -> list[list[Any]]:
    kept = [e for e in (entries or []) if not (e[1] == entry[1] and e[4] == entry[4])]
    kept.append(entry)
    kept.sort(key=lambda e: (e[5], e[1], e[4]))
    return kept[-MAX_INDEX_ENTRIES_PER_BAND:]


def evidence_matches(
    hashes: Mapping[str, int],
    *,
    refund_id: str,
    requested_at: datetime,
    band_keys: Callable[[int], list[str]],
    distance: Callable[[int, int], int],
    max_distance: int,
    lookup: Callable[[str], list[list[Any]] | None],
) -> tuple[EvidenceMatch, ...]:
    """Earlier claims (strictly earlier event time, other refunds) with a near-identical evidence photo.

    In first-use order, one match per (image, earlier refund).
    """
    found: dict[tuple[str, str], tuple[str, EvidenceMatch]] = {}
    for image_id, h in sorted(hashes.items()):
        for band in band_keys(h):
            for entry in lookup(band) or []:
                other_hash, other_refund, other_buyer, other_order, other_image, when = entry
                if other_refund == refund_id or _ts(when) >= requested_at:
                    continue
                d = distance(h, int(other_hash, 16))
                if d > max_distance:
                    continue
                key = (image_id, other_refund)
                match = EvidenceMatch(image_id, other_refund, other_buyer, other_order, other_image, d)
                if key not in found or d < found[key][1].distance:
                    found[key] = (when, match)
    return tuple(m for _, m in sorted(found.values(), key=lambda wm: (wm[0], wm[1].earlier_refund_id)))
