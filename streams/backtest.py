"""Figures for a replay against labelled cases (``refundguard replay --labels``, the demo).

Labels are JSON lines with ``refund_id``, ``kind``, ``expected`` (approve/hold), ``fraud``
and optionally ``detectable`` and ``expected_reason`` — the shape both
``refundguard simulate`` and the shared case generator write. The figures match the
case generator's scorer: catch rate over detectable fraud, false holds over genuine
requests that policy would approve, policy holds over genuine requests it sends to review.

"Right reason" counts holds that name the reason the label expects; a label without
``expected_reason`` (the shared generator writes none) expects the reason of its kind in
``KIND_REASONS``. "Leading" counts holds whose first (strongest) reason is that one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The reasons that explain each fraud kind; any code in the set counts (AI labels come in several forms).
AI_LABEL_CODES = frozenset({"AI_LABEL_IMPLICIT", "AI_C2PA_SOURCE_TYPE", "AI_IPTC_SOURCE_TYPE", "AI_GENERATOR_METADATA",
                            "AI_EDITOR_SOFTWARE"})
KIND_REASONS: dict[str, frozenset[str]] = {
    "edited_listing": frozenset({"EVIDENCE_EDITED_FROM_LISTING"}),
    "ai_generated": AI_LABEL_CODES,
    "reused_evidence": frozenset({"EVIDENCE_REUSED", "EVIDENCE_REUSED_SAME_BUYER"}),
    "serial_abuser": frozenset({"CLAIM_VELOCITY_HIGH"}),
    "linked_to_fraudster": frozenset({"LINKED_TO_CONFIRMED_FRAUD"}),
    "high_value": frozenset({"HIGH_VALUE"}),
}


def expected_reasons(label: Mapping[str, Any]) -> frozenset[str]:
    wanted = label.get("expected_reason")
    if wanted:
        return frozenset({wanted}) | (AI_LABEL_CODES if wanted in AI_LABEL_CODES else frozenset())
    return KIND_REASONS.get(label.get("kind", ""), frozenset())


def read_labels(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read labels {path}: {exc}") from exc


def figures(labels: list[dict[str, Any]], decisions: Mapping[str, Mapping[str, Any]]) -> Iterator[str]:
    groups = {"catch": [0, 0], "false_hold": [0, 0], "policy_hold": [0, 0]}
    # n, held, missing, right reason named, right reason leading
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    wrong: list[str] = []
    for label in labels:
        row = kinds[label["kind"]]
        row[0] += 1
        decision = decisions.get(label["refund_id"])
        if decision is None:
            row[2] += 1
            continue
        held = decision["decision"] == "hold"
        row[1] += held
        codes = [r["code"] for r in decision.get("reasons", [])]
        wanted = expected_reasons(label)
        if wanted and held:
            row[3] += bool(wanted & set(codes))
            row[4] += codes[0] in wanted
            if not wanted & set(codes) and label.get("detectable", True):
                wrong.append(f"{label['refund_id']} ({label['kind']}): {', '.join(codes)}")
        if label.get("fraud"):
            if label.get("detectable", label.get("expected") == "hold"):
                groups["catch"][0] += held
                groups["catch"][1] += 1
        else:
            group = "policy_hold" if label.get("expected") == "hold" else "false_hold"
            groups[group][0] += held
            groups[group][1] += 1

    def pct(group: str) -> str:
        held, of = groups[group]
        return f"{100 * held / of:5.1f}% ({held}/{of})" if of else "n/a"

    missing = sum(r[2] for r in kinds.values())
    yield f"labelled {len(labels)}; missing {missing}"
    yield f"catch rate {pct('catch')}   false holds {pct('false_hold')}   policy holds {pct('policy_hold')}"
    yield f"{'kind':24s} {'n':>4s} {'held':>5s} {'missing':>8s} {'right reason':>13s} {'leading':>8s}"
    for kind, (n, held, miss, right, leading) in sorted(kinds.items()):
        yield f"{kind:24s} {n:4d} {held:5d} {miss:8d} {right:13d} {leading:8d}"
    for line in wrong[:20]:
        yield f"held without the expected reason: {line}"
