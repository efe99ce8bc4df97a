"""Shared fixtures for the deployment tests: what the service exports and reads.

The facts come from the code (streams.metrics, streams.settings), never from the
deployment files, so a manifest that drifts from the code fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from pydantic_settings import BaseSettings

from streams.metrics import Metrics
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "refundguard.json"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

# Labels Prometheus attaches to every scraped series, on top of the metric's own labels.
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace"})


@dataclass(frozen=True)
class Exported:
    """Sample names the worker exports, each with its label names."""

    samples: dict[str, frozenset[str]]
    families: frozenset[str]
    # Families whose label names are not fixed in code (Info: the worker decides).
    free_label_samples: frozenset[str]


def _collect(registry: CollectorRegistry) -> dict[str, frozenset[str]]:
    samples: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in samples.items()}


@pytest.fixture(scope="session")
def exported() -> Exported:
    metrics = Metrics()
    # A labelled metric exports no sample until a child exists: create one child per metric
    # so the registry shows every sample name with its labels.
    for value in vars(metrics).values():
        labelnames = getattr(value, "_labelnames", ())
        if labelnames:
            value.labels(*["x"] * len(labelnames))
    families = frozenset(family.name for family in metrics.registry.collect())
    samples = _collect(metrics.registry)
    free = frozenset(
        sample.name for family in metrics.registry.collect() if family.type == "info" for sample in family.samples
    )
    return Exported(samples=samples, families=families, free_label_samples=free)


@pytest.fixture(scope="session")
def default_collector_samples() -> dict[str, frozenset[str]]:
    """process_* / python_* samples of prometheus_client's default collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return _collect(registry)


@pytest.fixture(scope="session")
def alert_rules() -> dict[str, Any]:
    return yaml.safe_load(ALERTS_FILE.read_text())


@pytest.fixture(scope="session")
def recorded_names(alert_rules: dict[str, Any]) -> frozenset[str]:
    return frozenset(rule["record"] for group in alert_rules["groups"] for rule in group["rules"] if "record" in rule)


def _nested_settings() -> dict[str, type[BaseSettings]]:
    return {
        name: field.annotation
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings)
    }


def settings_env_vars() -> dict[str, tuple[type[BaseSettings], str]]:
    """Every environment variable the settings read -> (settings class, field name)."""
    env: dict[str, tuple[type[BaseSettings], str]] = {}
    nested = _nested_settings()
    for name, field in Settings.model_fields.items():
        if name in nested:
            model = nested[name]
            prefix = model.model_config.get("env_prefix", "")
            for sub in model.model_fields:
                env[(prefix + sub).upper()] = (model, sub)
            continue
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            for choice in choices:
                env[str(choice).upper()] = (Settings, name)
        else:
            env[(Settings.model_config.get("env_prefix", "") + name).upper()] = (Settings, name)
    return env


@pytest.fixture(scope="session")
def known_env_vars() -> dict[str, tuple[type[BaseSettings], str]]:
    return settings_env_vars()
