"""Deployment files agree with the code and with each other.

Ports, paths, topic names, partition counts and settings variables are read from
``streams.settings``; the health endpoints are the constants below (the worker's web
module is checked against the same strings).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.app import topic_names
from streams.settings import Settings, TopicSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

HEALTH_LIVE_PATH = "/health/live"
HEALTH_READY_PATH = "/health/ready"
METRICS_PATH = "/metrics"
METRICS_PORT_NAME = "http-metrics"
# Set per pod from metadata.name: Kafka static group membership.
GROUP_INSTANCE_ID_ENV = "REFUNDGUARD_GROUP_INSTANCE_ID"
# Variables a manifest may set that are not application settings.
NON_SETTINGS_ENV = frozenset({GROUP_INSTANCE_ID_ENV, "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"})

# Defaults from the field definitions, whatever the environment of the test run holds.
DEFAULTS = Settings.model_construct()
TOPICS = TopicSettings.model_construct()
WEB_PORT = DEFAULTS.web_port


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


@pytest.fixture(autouse=True)
def _clean_settings_env(monkeypatch):
    """Settings tests below set variables; start each test without any from the shell."""
    for name in list(os.environ):
        if name.startswith("REFUNDGUARD_") or name == "KAFKA_BOOTSTRAP":
            monkeypatch.delenv(name)


# ---- every file parses ------------------------------------------------------------------


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents, f"{path} is empty"


def test_dashboard_json_parses():
    assert json.loads((DEPLOY / "grafana" / "refundguard.json").read_text())["panels"]


# ---- Kubernetes ---------------------------------------------------------------------------

EXPECTED_KINDS = {
    "statefulset.yaml": ("apps/v1", "StatefulSet"),
    "service.yaml": ("v1", "Service"),
    "configmap.yaml": ("v1", "ConfigMap"),
    "keda-scaledobject.yaml": ("keda.sh/v1alpha1", "ScaledObject"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
    "podmonitor.yaml": ("monitoring.coreos.com/v1", "PodMonitor"),
}


@pytest.fixture(scope="module")
def statefulset() -> dict[str, Any]:
    return load(K8S / "statefulset.yaml")


@pytest.fixture(scope="module")
def pod_spec(statefulset) -> dict[str, Any]:
    return statefulset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def worker(pod_spec) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "worker"]
    return container


@pytest.fixture(scope="module")
def config() -> dict[str, str]:
    return load(K8S / "configmap.yaml")["data"]


@pytest.mark.parametrize(("filename", "api_kind"), EXPECTED_KINDS.items())
def test_k8s_kinds(filename, api_kind):
    document = load(K8S / filename)
    assert (document["apiVersion"], document["kind"]) == api_kind
    assert document["metadata"]["name"]


def test_kustomization_lists_every_manifest():
    kustomization = load(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    assert set(resources) == set(EXPECTED_KINDS)


def test_probes_hit_the_health_endpoints_on_the_metrics_port(worker):
    ports = {port["name"]: port["containerPort"] for port in worker["ports"]}
    assert ports[METRICS_PORT_NAME] == WEB_PORT
    expected = {
        "livenessProbe": HEALTH_LIVE_PATH,
        "readinessProbe": HEALTH_READY_PATH,
        "startupProbe": HEALTH_LIVE_PATH,
    }
    for probe_name, path in expected.items():
        probe = worker[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        assert probe["port"] in (METRICS_PORT_NAME, WEB_PORT), probe_name


def test_scrape_annotations_point_at_the_metrics_endpoint(statefulset):
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == WEB_PORT
    assert annotations["prometheus.io/path"] == METRICS_PATH


def test_resources_requests_and_limits(worker):
    resources = worker["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


def test_image_worker_pool_is_sized_to_the_cpu_limit(worker, config):
    # image_workers=0 means os.cpu_count(): the node's CPUs, not the container's limit.
    workers = int(config["REFUNDGUARD_SCORING_IMAGE_WORKERS"])
    assert 1 <= workers <= float(worker["resources"]["limits"]["cpu"])


def test_runs_as_non_root_with_read_only_root(pod_spec, worker):
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] != 0
    container_security = worker["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount["name"] for mount in worker["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be writable under a read-only root"


def test_state_volume_is_mounted_at_the_data_dir(statefulset, worker, config):
    claim_names = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in worker["volumeMounts"]}
    (state_mount,) = [mounts[name] for name in claim_names if name in mounts]
    assert config["REFUNDGUARD_DATA_DIR"] == state_mount


def test_pod_name_is_the_static_group_member_id(worker):
    env = {item["name"]: item for item in worker.get("env", [])}
    assert env[GROUP_INSTANCE_ID_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_group_instance_id_variable_is_a_setting(known_env_vars):
    if not any(field == "group_instance_id" for _model, field in known_env_vars.values()):
        pytest.skip("streams.settings has no group_instance_id yet; the manifests already set it")
    assert GROUP_INSTANCE_ID_ENV in known_env_vars


def test_shutdown_is_graceful_and_service_links_are_off(pod_spec):
    assert pod_spec["terminationGracePeriodSeconds"] >= 60
    # Service links inject e.g. REFUNDGUARD_WEB_PORT=tcp://... for a Service named refundguard-web.
    assert pod_spec["enableServiceLinks"] is False


def test_replicas_are_left_to_keda(statefulset):
    assert "replicas" not in statefulset["spec"]


def test_headless_service_governs_the_statefulset(statefulset):
    service = load(K8S / "service.yaml")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == WEB_PORT
    assert port["targetPort"] == METRICS_PORT_NAME


def test_configmap_sets_only_known_settings_and_they_validate(config, known_env_vars, monkeypatch):
    unknown = set(config) - set(known_env_vars)
    assert unknown == set(), f"not read by streams.settings: {sorted(unknown)}"
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.web_port == WEB_PORT
    assert settings.web_host == "0.0.0.0"
    assert settings.topics.partitions == TOPICS.partitions


def test_statefulset_env_is_known(worker, known_env_vars):
    for item in worker.get("env", []):
        assert item["name"] in known_env_vars or item["name"] in NON_SETTINGS_ENV, item["name"]
    assert [ref["configMapRef"]["name"] for ref in worker["envFrom"]] == [
        load(K8S / "configmap.yaml")["metadata"]["name"]
    ]


def test_keda_scales_on_the_request_topic_lag_within_the_partition_count(statefulset, config):
    scaled = load(K8S / "keda-scaledobject.yaml")["spec"]
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet"
    assert scaled["scaleTargetRef"]["name"] == statefulset["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= TOPICS.partitions
    assert scaled["maxReplicaCount"] <= int(config["REFUNDGUARD_TOPIC_PARTITIONS"])
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert metadata["consumerGroup"] == config.get("REFUNDGUARD_APP_ID", DEFAULTS.app_id) == DEFAULTS.app_id
    assert metadata["topic"] == config.get("REFUNDGUARD_TOPIC_REQUESTS", TOPICS.requests) == TOPICS.requests
    assert metadata["bootstrapServers"] == config["KAFKA_BOOTSTRAP"]
    assert int(metadata["lagThreshold"]) > 0


def test_podmonitor_scrapes_the_metrics_port_as_the_alerts_job(worker):
    monitor = load(K8S / "podmonitor.yaml")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {port["name"] for port in worker["ports"]}
    assert endpoint["path"] == METRICS_PATH
    job = {r["targetLabel"]: r.get("replacement") for r in endpoint["relabelings"]}["job"]
    assert job == alerts_job()


# ---- Prometheus ----------------------------------------------------------------------------


def alerts_job() -> str:
    jobs = set(re.findall(r'\bup\{job="([^"]+)"', (DEPLOY / "prometheus" / "alerts.yml").read_text()))
    assert len(jobs) == 1, jobs
    return jobs.pop()


def test_prometheus_scrapes_the_worker_as_the_alerts_job(compose):
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == alerts_job()]
    assert job.get("metrics_path", "/metrics") == METRICS_PATH
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    worker_env = compose["services"]["worker"]["environment"]
    port = int(worker_env.get("REFUNDGUARD_WEB_PORT", WEB_PORT))
    assert targets == [f"worker:{port}"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file(), rule_file


def test_every_alert_has_severity_summary_description_and_a_runbook():
    rules = load(DEPLOY / "prometheus" / "alerts.yml")
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 7
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        assert annotations["runbook"] == f"docs/operations.md#{alert['alert'].lower()}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    rules = load(DEPLOY / "prometheus" / "alerts.yml")
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    tests = load(DEPLOY / "prometheus" / "alerts_test.yml")["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


# ---- docker compose ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(DEPLOY / "docker-compose.yml")


def test_compose_has_the_stack(compose):
    assert {"kafka", "topic-init", "worker", "prometheus", "grafana"} <= set(compose["services"])


def test_kafka_runs_in_kraft_mode(compose):
    env = compose["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env


def test_worker_is_wired_to_kafka(compose, known_env_vars):
    services = compose["services"]
    worker = services["worker"]
    env = worker["environment"]
    host, _, port = env["KAFKA_BOOTSTRAP"].rpartition(":")
    assert host in services
    advertised = services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{host}:{port}" in advertised
    assert env["REFUNDGUARD_WEB_HOST"] == "0.0.0.0"
    assert worker["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    assert services["topic-init"]["depends_on"][host]["condition"] == "service_healthy"
    assert "healthcheck" in services[host]
    for name in env:
        assert name in known_env_vars or name in NON_SETTINGS_ENV, name


def test_worker_builds_from_the_repository_with_the_deploy_dockerfile(compose):
    build = compose["services"]["worker"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    ports = compose["services"]["worker"]["ports"]
    assert any(str(port).endswith(f":{WEB_PORT}") for port in ports)


def test_topic_init_creates_the_service_topics_with_the_configured_partitions(compose):
    script = "\n".join(compose["services"]["topic-init"]["command"])
    created = re.findall(r"^\s*create\s+(\S+)", script, flags=re.MULTILINE)
    # With a shadow policy configured the worker also writes the shadow topic.
    expected = set(topic_names(Settings(shadow_policy_file=Path("shadow.toml"))))
    assert TOPICS.shadow_decisions in expected
    assert set(created) == expected
    partitions = {int(n) for n in re.findall(r"--partitions\s+(\d+)", script)}
    assert partitions == {TOPICS.partitions}


def test_prometheus_mounts_its_config_and_rules_and_keeps_a_week(compose):
    prometheus = compose["services"]["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert (DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    assert (DEPLOY / mounts["/etc/prometheus/alerts.yml"]).resolve() == DEPLOY / "prometheus" / "alerts.yml"
    (retention,) = [arg for arg in prometheus["command"] if arg.startswith("--storage.tsdb.retention.time=")]
    assert int(retention.split("=")[1].removesuffix("d")) >= 7, "the hold-rate baseline averages 7 days"


def test_grafana_is_provisioned_with_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    provisioning = (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve()
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    (provider,) = load(provisioning / "dashboards" / "refundguard.yml")["providers"]
    dashboard_targets = [t for t, s in mounts.items() if s.endswith("refundguard.json")]
    assert [str(Path(t).parent) for t in dashboard_targets] == [provider["options"]["path"]]
    (datasource,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].split("//")[1].split(":")[0] in compose["services"]


# ---- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_dockerfile_is_multi_stage_on_python_311_slim():
    instructions = dockerfile_instructions()
    args = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            args[name] = value
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arguments.split()[0])
        for keyword, arguments in instructions
        if keyword == "FROM"
    ]
    assert len(bases) >= 2
    assert all(base.startswith("python:3.11-slim") for base in bases)
    copies_from_build = [a for k, a in final_stage() if k == "COPY" and a.startswith("--from=")]
    assert copies_from_build, "the runtime stage must take the venv from the build stage"


def test_dockerfile_runs_as_non_root_matching_the_pod_user(pod_spec):
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(user) == pod_spec["securityContext"]["runAsUser"]


def test_dockerfile_healthcheck_exposes_and_entrypoint():
    stage = final_stage()
    keywords = dict(stage)
    assert HEALTH_LIVE_PATH in keywords["HEALTHCHECK"]
    assert "curl" not in keywords["HEALTHCHECK"]
    assert [int(port.split("/")[0]) for port in keywords["EXPOSE"].split()] == [WEB_PORT]
    assert json.loads(keywords["ENTRYPOINT"]) == ["refundguard"]
    assert json.loads(keywords["CMD"]) == ["worker"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "refundguard" in scripts


def test_dockerfile_state_volume_and_web_settings(config):
    stage = final_stage()
    env = dockerfile_env(stage)
    volumes = [json.loads(arguments) for keyword, arguments in stage if keyword == "VOLUME"]
    assert [env["REFUNDGUARD_DATA_DIR"]] in volumes
    assert env["REFUNDGUARD_DATA_DIR"] == config["REFUNDGUARD_DATA_DIR"]
    assert env["REFUNDGUARD_WEB_HOST"] == "0.0.0.0"
    assert int(env.get("REFUNDGUARD_WEB_PORT", WEB_PORT)) == WEB_PORT


def test_docker_build_context_keeps_the_package_sources():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!streams/", "!scorers/"):
        assert needed in ignore
