"""Backtest figures: catch / false-hold rates and whether each hold names the reason its kind expects."""

from __future__ import annotations

from typing import Any

from streams.backtest import expected_reasons, figures


def _decision(refund_id: str, decision: str, *codes: str) -> dict[str, Any]:
    return {"refund_id": refund_id, "decision": decision, "reasons": [{"code": c} for c in codes]}


def test_labels_without_expected_reason_expect_the_reason_of_their_kind() -> None:
    assert expected_reasons({"kind": "edited_listing"}) == {"EVIDENCE_EDITED_FROM_LISTING"}
    assert "AI_C2PA_SOURCE_TYPE" in expected_reasons({"kind": "ai_generated"})
    assert expected_reasons({"kind": "genuine_photo"}) == frozenset()
    # An explicit expectation wins; an AI label accepts any AI label code.
    assert expected_reasons({"kind": "edited_listing", "expected_reason": "HIGH_VALUE"}) == {"HIGH_VALUE"}
    assert "AI_EDITOR_SOFTWARE" in expected_reasons({"kind": "x", "expected_reason": "AI_LABEL_IMPLICIT"})


def test_figures_count_named_and_leading_reasons_and_list_holds_without_them() -> None:
    labels = [
        {"refund_id": "a", "kind": "edited_listing", "fraud": True, "expected": "hold", "detectable": True},
        {"refund_id": "b", "kind": "edited_listing", "fraud": True, "expected": "hold", "detectable": True},
        {"refund_id": "c", "kind": "edited_listing", "fraud": True, "expected": "hold", "detectable": True},
        {"refund_id": "d", "kind": "genuine_photo", "fraud": False, "expected": "approve"},
        {"refund_id": "e", "kind": "genuine_photo", "fraud": False, "expected": "approve"},
    ]
    decisions = {
        "a": _decision("a", "hold", "EVIDENCE_EDITED_FROM_LISTING"),
        "b": _decision("b", "hold", "AI_LABEL_IMPLICIT", "EVIDENCE_EDITED_FROM_LISTING"),
        "c": _decision("c", "hold", "AI_LABEL_IMPLICIT", "EVIDENCE_IS_REFERENCE_PHOTO"),
        "d": _decision("d", "approve"),
    }
    lines = list(figures(labels, decisions))
    assert lines[0] == "labelled 5; missing 1"
    assert "catch rate 100.0% (3/3)" in lines[1] and "false holds   0.0% (0/1)" in lines[1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:] if not line.startswith("held")}
    assert rows["edited_listing"] == ["3", "3", "0", "2", "1"]  # n, held, missing, named, leading
    assert rows["genuine_photo"] == ["2", "0", "1", "0", "0"]
    assert lines[-1] == ("held without the expected reason: c (edited_listing): "
                         "AI_LABEL_IMPLICIT, EVIDENCE_IS_REFERENCE_PHOTO")
