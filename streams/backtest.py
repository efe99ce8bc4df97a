"""Figures for a replay against labelled cases (``refundguard replay --labels``, the demo).

Labels are JSON lines with ``refund_id``, ``kind``, ``expected`` (approve/hold), ``fraud``
and optionally ``detectable`` and ``expected_reason`` — the shape both
``refundguard simulate`` and the shared case generator write. The figures match the
case generator's scorer: catch rate over detectable fraud, false holds over genuine
requests that policy would approve, policy holds over genuine requests it sends to review.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def read_labels(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read labels {path}: {exc}") from exc


def figures(labels: list[dict[str, Any]], decisions: Mapping[str, Mapping[str, Any]]) -> Iterator[str]:
    groups = {"catch": [0, 0], "false_hold": [0, 0], "policy_hold": [0, 0]}
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # n, held, missing, right reason
    for label in labels:
        row = kinds[label["kind"]]
        row[0] += 1
        decision = decisions.get(label["refund_id"])
        if decision is None:
            row[2] += 1
            continue
        held = decision["decision"] == "hold"
        row[1] += held
        wanted = label.get("expected_reason")
        row[3] += bool(wanted) and held and wanted in {r["code"] for r in decision.get("reasons", [])}
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
    yield f"{'kind':24s} {'n':>4s} {'held':>5s} {'missing':>8s} {'right reason':>13s}"
    for kind, (n, held, miss, right) in sorted(kinds.items()):
        yield f"{kind:24s} {n:4d} {held:5d} {miss:8d} {right:13d}"
