"""docs/operations.md lists every setting with its real default and has every runbook."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
OPERATIONS_DOC = REPO / "docs" / "operations.md"
ALERTS_FILE = REPO / "deploy" / "prometheus" / "alerts.yml"


def render_default(value: Any) -> str:
    """How the configuration table writes a default."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, set | frozenset):
        return json.dumps(sorted(value), separators=(",", ":"))
    return str(value)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def doc_text() -> str:
    return OPERATIONS_DOC.read_text()


def table_row(variable: str) -> str:
    rows = [line for line in doc_text().splitlines() if line.startswith(f"| `{variable}` |")]
    assert len(rows) == 1, f"{variable} must have exactly one row in the configuration table"
    return rows[0]


def defaults_by_env_var(known_env_vars) -> dict[str, Any]:
    """Default of every variable, read from the field definitions (not the environment)."""
    defaults = {}
    for variable, (model, field) in known_env_vars.items():
        if variable == "REFUNDGUARD_BOOTSTRAP":
            continue  # alias of KAFKA_BOOTSTRAP, mentioned in its row
        defaults[variable] = model.model_fields[field].get_default(call_default_factory=True)
    return defaults


def test_every_setting_is_documented_with_its_default(known_env_vars):
    defaults = defaults_by_env_var(known_env_vars)
    assert "KAFKA_BOOTSTRAP" in defaults and "REFUNDGUARD_TOPIC_PARTITIONS" in defaults
    for variable, default in defaults.items():
        assert f"| `{render_default(default)}` |" in table_row(variable), variable


def test_documented_variables_exist(known_env_vars):
    table_variables = re.findall(r"^\| `((?:REFUNDGUARD|KAFKA)_[A-Z0-9_]+)` \|", doc_text(), flags=re.MULTILINE)
    assert table_variables
    assert set(table_variables) <= set(known_env_vars)


def test_defaults_match_a_fresh_settings_object(monkeypatch, known_env_vars):
    # The same defaults the running service sees with no variables set.
    for variable in known_env_vars:
        monkeypatch.delenv(variable, raising=False)
    settings = Settings()
    assert f"`{settings.web_port}`" in table_row("REFUNDGUARD_WEB_PORT")
    assert f"`{settings.topics.partitions}`" in table_row("REFUNDGUARD_TOPIC_PARTITIONS")


def alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_runbook_anchor_exists(alert):
    path, _, anchor = alert["annotations"]["runbook"].partition("#")
    assert (REPO / path).resolve() == OPERATIONS_DOC
    headings = re.findall(r"^#{1,6}\s+(.+)$", doc_text(), flags=re.MULTILINE)
    assert anchor in {github_anchor(heading) for heading in headings}
    # The runbook explains the alert's severity too.
    section = doc_text().split(f"### {alert['alert']}\n", 1)[1].split("\n### ", 1)[0]
    assert f"*{alert['labels']['severity']}.*" in section


def test_internal_links_resolve():
    text = doc_text()
    anchors = {github_anchor(heading) for heading in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.MULTILINE)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    assert set(links) <= anchors
