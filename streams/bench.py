"""``refundguard bench``: the performance and reliability figures, measured on this machine.

One command prints every figure with its target, and writes a JSON copy that the next run
compares with (deltas are printed):

1. CPU ms per evidence image for each stage of the image job (prepare, fingerprint, each
   image scorer) and in total, measured in-process with :func:`streams.image_pool.run_image_job`
   on the project's simulated traffic (or a casegen directory).
2. Sustained decisions/s and produce-to-decision latency (p50/p95/p99) with the embedded broker
   and one worker subprocess, at full load (produce as fast as possible) and at half load (paced
   at half the measured full-load rate), with the full scorer set.
3. The same with the image scorers switched off, and a pass-through Faust agent (consume
   raw, publish, no scoring) on the same broker, as a ratio.
4. Worker peak RSS (VmHWM) of the worker and its pool children.
5. One worker against two workers in one consumer group.

Latency is measured by the bench's own producer and consumer: the wall-clock time a request is
handed to the producer, to the time its decision (same key) is returned by a fetch of the
decisions topic. Every scenario runs on its own topics and consumer group, so nothing left over
from one scenario reaches the next.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = "refundguard-bench/v1"
DEFAULT_RESULTS = Path("bench") / "results.json"  # relative to where it runs: the repository root
IMAGE_SCORERS_OFF = ["image.reference", "image.provenance", "image.capture"]
# The job stages run_image_job reports, in the order it runs them.
JOB_STAGES = ("prepare", "fingerprint")
TOTAL = "total"
TARGET_CPU_MS_PER_IMAGE = 40.0
TARGET_MAX_MEGAPIXELS = 2.0
TARGET_RATE_IMAGES = 30.0
TARGET_RATE_NO_IMAGES = 3000.0
TARGET_P99_HALF_S = 1.0
TARGET_RSS_MB = 500.0
TARGET_SCALE_OUT = 1.8
# The bench consumer's longest fetch wait: bounds what it adds to a measured latency.
CONSUMER_FETCH_WAIT_MS = 20


# ------------------------------------------------------------------ pure figures


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    return {"p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95),
            "p99_s": percentile(seconds, 99), "max_s": max(seconds) if seconds else math.nan}


def sustained_rate(arrivals: Sequence[float], trim: float = 0.1) -> float:
    """Decisions per second over the middle of a run: the first and last ``trim`` of the
    arrivals (start-up, the drain of the tail) are left out."""
    ordered = sorted(arrivals)
    if len(ordered) < 2:
        return math.nan
    if len(ordered) < 20:
        first, last = 0, len(ordered) - 1
    else:
        first, last = int(len(ordered) * trim), int(len(ordered) * (1 - trim)) - 1
    span = ordered[last] - ordered[first]
    return (last - first) / span if span > 0 else math.inf


@dataclass(frozen=True)
class JobCpu:
    """CPU seconds of one image job by stage, and what it covered."""

    seconds: dict[str, float]
    evidence_images: int
    evidence_megapixels: float  # the largest evidence image of the job, in the file's own size


def cpu_figures(jobs: Iterable[JobCpu], max_megapixels: float | None = None) -> dict[str, dict[str, float]]:
    """Per stage: median and p95 CPU ms per evidence image, over jobs with at least one evidence
    image (and, if given, no evidence image over ``max_megapixels``). A job's stage time is split
    evenly over its evidence images; ``total`` is the whole job (every stage) per evidence image."""
    per_stage: dict[str, list[float]] = {}
    for job in jobs:
        if job.evidence_images == 0:
            continue
        if max_megapixels is not None and job.evidence_megapixels > max_megapixels:
            continue
        for stage, seconds in job.seconds.items():
            per_stage.setdefault(stage, []).append(seconds * 1000 / job.evidence_images)
        per_stage.setdefault(TOTAL, []).append(sum(job.seconds.values()) * 1000 / job.evidence_images)
    return {stage: {"median_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "mean_ms": sum(ms) / len(ms),
                    "n": len(ms)}
            for stage, ms in per_stage.items()}


@dataclass
class Figure:
    key: str
    label: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    higher_is_better: bool | None = None  # for the delta against the previous run
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": _finite(self.value), "unit": self.unit, "target": self.target,
                "met": self.met, "higher_is_better": self.higher_is_better, "note": self.note}


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 4)


def compare(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, str]:
    """Figure key -> the change since ``previous`` ("+12.0% better", "-3.1% worse", "new", "=")."""
    old = (previous or {}).get("figures", {})
    changes: dict[str, str] = {}
    for key, figure in current.get("figures", {}).items():
        value = figure.get("value")
        before = old.get(key, {}).get("value") if key in old else None
        if key not in old:
            changes[key] = "new" if previous is not None else ""
            continue
        if value is None or before is None:
            changes[key] = "n/a"
            continue
        if value == before:
            changes[key] = "="
            continue
        delta = (value - before) / abs(before) * 100 if before else math.inf
        better = figure.get("higher_is_better")
        verdict = "" if better is None else (" better" if (value > before) == better else " worse")
        changes[key] = f"{delta:+.1f}%{verdict}" if math.isfinite(delta) else f"{before:g}->{value:g}"
    return changes


# ------------------------------------------------------------------ traffic


@dataclass(frozen=True)
class Traffic:
    """Refund requests (values, in event order) and the directory their image URLs map into."""

    root: Path
    requests: list[dict[str, Any]]
    description: str


_IMAGES_PATH = re.compile(r"^[a-z]+://[^/]+(/images/.+)$")


def local_path(root: Path, url: str) -> Path | None:
    """``http://host:port/images/X`` -> ``root/images/X`` (how simulate and casegen lay images out)."""
    match = _IMAGES_PATH.match(url)
    return root / match.group(1).lstrip("/") if match else None


def load_traffic(root: Path, description: str) -> Traffic:
    requests: list[dict[str, Any]] = []
    for line in (root / "events.jsonl").read_text("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "outcome" not in row["topic"] and isinstance(row["value"], dict):
            requests.append(row["value"])
    if not requests:
        raise ValueError(f"{root / 'events.jsonl'} has no refund requests")
    return Traffic(root, requests, description)


def simulated_traffic(work: Path, refunds: int, seed: int) -> Traffic:
    """Generate (or reuse, when the same size and seed were generated there before) simulated traffic."""
    from streams.simulate.traffic import generate

    out = work / f"sim-{refunds}-{seed}"
    summary_path = out / "summary.json"
    if not summary_path.exists():
        if out.exists():
            shutil.rmtree(out)
        generate(out, refunds=refunds, seed=seed, image_base="http://127.0.0.1:8765")
    summary = json.loads(summary_path.read_text())
    return load_traffic(out, f"simulated traffic, seed {seed}: {summary['refunds']} refunds, "
                             f"{summary['images']} images")


def _image_bytes(root: Path, ref: dict[str, Any]) -> bytes | None:
    if ref.get("data") is not None:
        try:
            return base64.b64decode(ref["data"], validate=True)
        except ValueError:
            return None
    path = local_path(root, ref.get("url") or "")
    if path is None or not path.is_file():
        return None
    return path.read_bytes()


def image_jobs(traffic: Traffic, working_side: int | None = None, max_pixels: int = 40_000_000,
               budget_s: float = 16.0) -> Iterator[tuple[Any, float]]:
    """An ImageJob per request, built as the worker builds it (missing files are left out, as a
    failed fetch is), with the megapixels of its largest evidence image. The working side is
    the worker's default unless given."""
    from PIL import Image

    from streams.settings import ScoringSettings

    if working_side is None:
        working_side = ScoringSettings().working_side

    from streams.contract import parse_request
    from streams.image_pool import ImageJob, RawImage

    for value in traffic.requests:
        request = parse_request(json.dumps(value).encode(), 1 << 22)
        raws: list[RawImage] = []
        megapixels = 0.0
        wanted = [("evidence", e) for e in request.evidence] + [(r.source, r) for r in request.reference_images]
        for role, ref in wanted:
            data = _image_bytes(traffic.root, ref.model_dump())
            if data is None:
                continue
            digest = hashlib.sha256(data).hexdigest()[:24]
            raws.append(RawImage(ref.image_id, role, data, f"{ref.url or 'inline'}#{digest}"))
            if role == "evidence":
                with contextlib.suppress(Exception):  # unreadable: prepare reports it
                    width, height = Image.open(io.BytesIO(data)).size
                    megapixels = max(megapixels, width * height / 1e6)
        yield ImageJob(request.facts(), tuple(raws), working_side, max_pixels, budget_s), megapixels


def measure_image_cpu(traffic: Traffic) -> tuple[list[JobCpu], dict[str, int]]:
    """Run every request's image job in this process, as a pool child would (one OpenCV thread),
    in event order so per-process caches warm as they do in a worker."""
    from streams.image_pool import run_image_job

    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)
    measured: list[JobCpu] = []
    problems: dict[str, int] = {}
    for job, megapixels in image_jobs(traffic):
        result = run_image_job(job)
        undecodable = sum(1 for p in result.problems if p.evidence.get("role") == "evidence")
        evidence = sum(1 for raw in job.images if raw.role == "evidence") - undecodable
        measured.append(JobCpu(dict(result.cpu_seconds), max(0, evidence), megapixels))
        for p in result.problems:
            problems[p.code] = problems.get(p.code, 0) + 1
    return measured, problems


def clone_requests(requests: Sequence[dict[str, Any]], count: int, tag: str, base_url: str | None) -> list[
        tuple[bytes, bytes]]:
    """``count`` (key, value) messages: copies of ``requests`` with fresh refund, order and buyer ids.
    A buyer keeps one id within a copy, so each copy has the traffic's own buyer histories.
    Image URLs are pointed at ``base_url`` (the bench's image server)."""
    out: list[tuple[bytes, bytes]] = []
    copy = 0
    while len(out) < count:
        suffix = f"~{tag}{copy}"
        for value in requests:
            if len(out) == count:
                break
            v = dict(value)
            for id_field in ("refund_id", "order_id", "buyer_id"):
                v[id_field] = f"{value[id_field]}{suffix}"
            if base_url is not None:
                v["evidence"] = [_rebase(e, base_url) for e in value.get("evidence", [])]
                v["reference_images"] = [_rebase(r, base_url) for r in value.get("reference_images", [])]
            out.append((v["refund_id"].encode(), json.dumps(v, separators=(",", ":")).encode()))
        copy += 1
    return out


def _rebase(ref: dict[str, Any], base_url: str) -> dict[str, Any]:
    url = ref.get("url")
    match = _IMAGES_PATH.match(url) if isinstance(url, str) else None
    return {**ref, "url": base_url.rstrip("/") + match.group(1)} if match else ref


# ------------------------------------------------------------------ processes


def _read_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _kib(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (pool children, the resource tracker, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def peak_rss_mb(pid: int) -> dict[str, Any]:
    """VmHWM (peak resident set) of a process and the sum over its descendants, in MB. The sum
    counts pages children share with each other twice, so it is an upper bound."""
    own = _kib(_read_status(pid).get("VmHWM")) / 1024
    each = {}
    for child in descendants(pid):
        status = _read_status(child)
        each[f"{child} {status.get('Name', '?').strip()}"] = round(_kib(status.get("VmHWM")) / 1024, 1)
    children = sum(each.values())
    return {"worker_mb": own, "children_mb": children, "total_mb": own + children, "processes": 1 + len(each),
            "children": each}


_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def runqueue_wait_seconds(pid: int) -> float:
    """Time the threads of ``pid`` spent runnable but waiting for a CPU (schedstat), in seconds."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def system_busy_seconds() -> float:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(x) for x in parts]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICKS


class CpuMeter:
    """CPU seconds spent by named process trees (and by everything else on the machine) between
    :meth:`start` and :meth:`stop`: the worker's share against the co-tenants' share."""

    def __init__(self, trees: dict[str, int]) -> None:
        self.trees = trees
        self._before: dict[int, float] = {}
        self._busy = 0.0
        self._bench = 0.0
        self.seconds: dict[str, float] = {}
        self.waits: dict[str, float] = {}  # runnable but not running: the machine was busy

    def _sample(self) -> dict[int, tuple[float, float]]:
        pids = [p for root in self.trees.values() for p in (root, *descendants(root))]
        return {p: (process_cpu_seconds(p), runqueue_wait_seconds(p)) for p in pids}

    def start(self) -> CpuMeter:
        self._before = self._sample()
        self._busy = system_busy_seconds()
        t = os.times()
        self._bench = t.user + t.system
        return self

    def stop(self) -> dict[str, float]:
        after = self._sample()
        busy = system_busy_seconds() - self._busy
        t = os.times()
        self.seconds = {}
        self.waits = {}
        for name, root in self.trees.items():
            pids = [root, *descendants(root)]
            zero = (0.0, 0.0)
            self.seconds[name] = sum(after.get(p, zero)[0] - self._before.get(p, zero)[0] for p in pids)
            self.waits[name] = sum(after.get(p, zero)[1] - self._before.get(p, zero)[1] for p in pids)
        self.seconds["bench"] = t.user + t.system - self._bench
        self.seconds["others"] = max(0.0, busy - sum(self.seconds.values()))
        return self.seconds


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    web_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def ready(self) -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{self.web_port}/health/ready", timeout=1) as response:
            return response.status == 200
        return False

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{self.name} exited with code {self.process.returncode}; its log ends with:\n{tail}")
            if self.ready():
                return
            time.sleep(0.3)
        raise BenchError(f"{self.name} was not ready within {timeout_s:g} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Scenario:
    """One consumer group with its own topics on the shared broker."""

    name: str
    partitions: int

    @property
    def requests_topic(self) -> str:
        return f"bench.{self.name}.requests"

    @property
    def decisions_topic(self) -> str:
        return f"bench.{self.name}.decisions"

    def env(self) -> dict[str, str]:
        prefix = f"bench.{self.name}"
        return {
            "REFUNDGUARD_APP_ID": f"bench-{self.name}",
            "REFUNDGUARD_TOPIC_REQUESTS": self.requests_topic,
            "REFUNDGUARD_TOPIC_OUTCOMES": f"{prefix}.outcomes",
            "REFUNDGUARD_TOPIC_DECISIONS": self.decisions_topic,
            "REFUNDGUARD_TOPIC_DLQ": f"{prefix}.dlq",
            "REFUNDGUARD_TOPIC_SHADOW_DECISIONS": f"{prefix}.decisions.shadow",
            "REFUNDGUARD_TOPIC_PARTITIONS": str(self.partitions),
        }


def start_worker(name: str, scenario: Scenario, bootstrap: str, work: Path, *, command: Sequence[str],
                 extra_env: dict[str, str] | None = None) -> Worker:
    from streams.broker import free_port

    web_port = free_port()
    log_path = work / f"{name}.log"
    state = work / f"{name}-state"
    shutil.rmtree(state, ignore_errors=True)  # the broker starts empty: old table state would not match it
    env = {
        **os.environ,
        **scenario.env(),
        "KAFKA_BOOTSTRAP": bootstrap,
        "REFUNDGUARD_WEB_PORT": str(web_port),
        "REFUNDGUARD_DATA_DIR": str(state),
        "REFUNDGUARD_FETCH_ALLOW_PRIVATE": "true",
        **(extra_env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=work)
    (work / f"{name}.pid").write_text(f"{process.pid}\n")  # for a profiler: py-spy record -p $(cat ...)
    return Worker(name, process, web_port, log_path)


# A group join waits the rebalance timeout out in full on Tansu; a group that will only ever have
# one member need not wait 5 s for others. Only start-up is shorter: steady state is the same.
ALONE = {"REFUNDGUARD_REBALANCE_TIMEOUT_S": "1"}


def service_worker(name: str, scenario: Scenario, bootstrap: str, work: Path, *, images: bool,
                   alone: bool = False) -> Worker:
    env = {} if images else {"REFUNDGUARD_SCORING_DISABLED": json.dumps(IMAGE_SCORERS_OFF)}
    if alone:
        env.update(ALONE)
    if images and "REFUNDGUARD_SCORING_DISABLED" in os.environ:
        env["REFUNDGUARD_SCORING_DISABLED"] = "[]"  # the full scorer set, whatever the shell says
    return start_worker(name, scenario, bootstrap, work, command=["-m", "streams.cli", "worker"], extra_env=env)


def passthrough_worker(name: str, scenario: Scenario, bootstrap: str, work: Path) -> Worker:
    return start_worker(name, scenario, bootstrap, work, command=["-m", "streams.bench", "_passthrough"],
                        extra_env=ALONE)


# ------------------------------------------------------------------ the pass-through agent


def build_passthrough() -> Any:
    """A Faust app with one agent that republishes refund.requests to the decisions topic as it
    is, awaiting each send like the service's intake: the floor for one Faust hop on this broker.
    Same Faust settings as the service; configured by the same environment variables."""
    import faust
    from aiohttp import web

    from streams.app import _is_ready
    from streams.kafka_compat import short_fetch_wait
    from streams.settings import Settings

    settings = Settings()
    short_fetch_wait(settings.consumer_fetch_max_wait_ms)
    t = settings.topics
    app = faust.App(
        settings.app_id, broker=settings.broker_url, store="memory://", datadir=str(settings.data_dir),
        topic_partitions=t.partitions, topic_allow_declare=True, topic_disable_leader=True,
        web_enabled=True, web_port=settings.web_port, web_bind=settings.web_host, web_host=settings.web_host,
        producer_max_request_size=4 * 1024 * 1024, consumer_max_fetch_size=8 * 1024 * 1024,
        producer_linger=settings.producer_linger_ms / 1000,
        broker_commit_every=200, broker_commit_interval=1.0,
        stream_buffer_maxsize=max(64, settings.scoring.batch_size * 4),
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=max(settings.rebalance_timeout_s, 10.0),
        processing_guarantee="at_least_once", producer_acks=-1, worker_redirect_stdouts=False,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw",
           "partitions": t.partitions}
    source = app.topic(t.requests, **raw)
    sink = app.topic(t.decisions, **raw)

    async def passthrough(stream: Any) -> Any:
        async for event in stream.events():
            await sink.send(key=event.message.key, value=event.message.value)
            yield None

    app.agent(source, name="passthrough")(passthrough)

    @app.page("/health/ready")
    async def ready(_web: Any, _request: Any) -> web.Response:
        ok = _is_ready(app)
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    return app


def run_passthrough() -> int:
    import faust

    faust.Worker(build_passthrough(), loglevel="WARNING", quiet=True).execute_from_commandline()
    return 0


# ------------------------------------------------------------------ driving load


@dataclass
class LoadResult:
    sent: int
    received: int
    latencies: list[float]
    arrivals: list[float]
    send_seconds: float  # first send to last send
    seconds: float  # first send to last decision
    duplicates: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    runqueue_wait: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return sustained_rate(self.arrivals)

    @property
    def offered_rate(self) -> float:
        return self.sent / self.send_seconds if self.send_seconds > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        cpu_per_decision = {k: v * 1000 / self.received for k, v in self.cpu.items()} if self.received else {}
        return {"sent": self.sent, "received": self.received, "duplicates": self.duplicates,
                "rate_per_s": _finite(self.rate), "offered_per_s": _finite(self.offered_rate),
                "seconds": round(self.seconds, 2),
                **{k: _finite(v) for k, v in latency_summary(self.latencies).items()},
                "cpu_s": {k: round(v, 2) for k, v in self.cpu.items()},
                "runqueue_wait_s": {k: round(v, 2) for k, v in self.runqueue_wait.items()},
                "cpu_ms_per_decision": {k: round(v, 3) for k, v in cpu_per_decision.items()}}


async def _drive(bootstrap: str, scenario: Scenario, messages: Sequence[tuple[bytes, bytes]], rate: float | None,
                 stall_s: float) -> LoadResult:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=CONSUMER_FETCH_WAIT_MS, max_partition_fetch_bytes=8 << 20)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False,
                                max_request_size=4 << 20, max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    try:
        partitions = [TopicPartition(scenario.decisions_topic, p) for p in range(scenario.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the seek before anything is sent
            await consumer.position(tp)
        sent_at: dict[bytes, float] = {}
        latencies: list[float] = []
        arrivals: list[float] = []
        duplicates = 0
        done = asyncio.Event()

        async def produce() -> tuple[float, float]:
            first = time.time()
            for i, (key, value) in enumerate(messages):
                if rate is not None:
                    due = first + i / rate
                    delay = due - time.time()
                    if delay > 0.002:
                        await asyncio.sleep(delay)
                sent_at[key] = time.time()
                await producer.send(scenario.requests_topic, value=value, key=key)
                if rate is None and i % 500 == 499:
                    await asyncio.sleep(0)  # let the consumer see early decisions
            last = time.time()
            await producer.flush()
            return first, last

        async def consume() -> None:
            nonlocal duplicates
            seen: set[bytes] = set()
            last_progress = time.monotonic()
            while len(seen) < len(messages):
                batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
                now = time.time()
                for records in batches.values():
                    for record in records:
                        key = record.key
                        if key not in sent_at:
                            continue  # a decision of something sent before this phase
                        if key in seen:
                            duplicates += 1
                            continue
                        seen.add(key)
                        latencies.append(now - sent_at[key])
                        arrivals.append(now)
                        last_progress = time.monotonic()
                if time.monotonic() - last_progress > stall_s:
                    break
            done.set()

        consumer_task = asyncio.create_task(consume())
        first, last = await produce()
        await consumer_task
        end = max(arrivals) if arrivals else time.time()
        return LoadResult(len(messages), len(latencies), latencies, arrivals, last - first, end - first, duplicates)
    finally:
        await producer.stop()
        await consumer.stop()


def drive(bootstrap: str, scenario: Scenario, messages: Sequence[tuple[bytes, bytes]], *, rate: float | None = None,
          stall_s: float = 30.0, meter: CpuMeter | None = None) -> LoadResult:
    if meter is not None:
        meter.start()
    result = asyncio.run(_drive(bootstrap, scenario, messages, rate, stall_s))
    if meter is not None:
        result.cpu = meter.stop()
        result.runqueue_wait = meter.waits
    return result


# ------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = _kib(line.split(":", 1)[1])
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model or platform.processor(),
            "ram_gb": round(mem_kib / 1024 / 1024, 1), "python": platform.python_version(),
            "kernel": platform.release()}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ------------------------------------------------------------------ the run


@dataclass
class Plan:
    refunds: int
    image_requests: int  # most requests at full load with the full scorer set
    plain_requests: int  # most requests at full load with image scorers off (also pass-through, two workers)
    full_seconds: float  # a full-load run is sized to last about this long at the warm-up's rate
    half_seconds: float
    warmup_images: int
    warmup_plain: int
    partitions: int
    phases: frozenset[str]


PHASES = ("cpu", "images", "plain", "passthrough", "scale")


def plan_for(args: argparse.Namespace) -> Plan:
    quick = args.quick
    phases = frozenset(args.phases.split(",")) if args.phases else frozenset(PHASES)
    unknown = phases - set(PHASES)
    if unknown:
        raise BenchError(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    return Plan(
        refunds=args.refunds or (40 if quick else 80),
        image_requests=args.image_requests or (40 if quick else 200),
        plain_requests=args.requests or (3_000 if quick else 20_000),
        full_seconds=6.0 if quick else 30.0,
        half_seconds=args.half_seconds or (5.0 if quick else 20.0),
        warmup_images=12 if quick else 24,
        warmup_plain=300 if quick else 1_000,
        partitions=int(os.environ.get("REFUNDGUARD_TOPIC_PARTITIONS", "8")),
        phases=phases,
    )


def full_load_size(warmup: LoadResult, seconds: float, most: int, least: int) -> int:
    """Requests for a full-load run of about ``seconds`` at the warm-up's rate, within [least, most]:
    enough to be meaningful, bounded in time on a slow or busy machine."""
    rate = warmup.received / max(warmup.seconds, 1e-3)  # first send to last decision: errs low
    return max(least, min(most, int(rate * seconds)))


class Run:
    """Collects the figures and the detail of one bench run."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.detail: dict[str, Any] = {}
        self.loads: dict[str, list[float]] = {}

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def note_load(self, phase: str) -> None:
        self.loads[phase] = loadavg()

    def rate_figures(self, prefix: str, label: str, full: LoadResult, half: LoadResult | None,
                     rate_target: float | None) -> None:
        self.add(Figure(f"{prefix}.full.rate", f"{label}: decisions/s at full load", full.rate, "/s",
                        f">= {rate_target:g}" if rate_target else "",
                        (full.rate >= rate_target) if rate_target else None, True,
                        f"{full.received}/{full.sent} decided"))
        for q in ("p50", "p95", "p99"):
            self.add(Figure(f"{prefix}.full.{q}", f"{label}: latency {q} at full load",
                            latency_summary(full.latencies)[f"{q}_s"] * 1000, "ms", higher_is_better=False))
        if half is None:
            return
        self.add(Figure(f"{prefix}.half.rate", f"{label}: decisions/s at half load (offered "
                        f"{half.offered_rate:.0f}/s)", half.rate, "/s", higher_is_better=True,
                        note=f"{half.received}/{half.sent} decided"))
        for q in ("p50", "p95", "p99"):
            value = latency_summary(half.latencies)[f"{q}_s"] * 1000
            target = f"<= {TARGET_P99_HALF_S * 1000:g}" if q == "p99" else ""
            met = (value <= TARGET_P99_HALF_S * 1000 and half.received == half.sent) if q == "p99" else None
            self.add(Figure(f"{prefix}.half.{q}", f"{label}: latency {q} at half load", value, "ms", target, met,
                            False))


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = plan_for(args)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="refundguard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run()
    started = time.monotonic()
    run.note_load("start")
    say = _printer(args)

    if args.cases:
        traffic = load_traffic(Path(args.cases), f"casegen cases in {args.cases}")
    else:
        say(f"generating {plan.refunds} simulated refunds in {work}")
        traffic = simulated_traffic(work, plan.refunds, args.seed)
    say(f"traffic: {traffic.description}; {len(traffic.requests)} requests")

    if "cpu" in plan.phases:
        _cpu_phase(run, traffic, say)
    if plan.phases & {"images", "plain", "passthrough", "scale"}:
        _load_phases(run, plan, traffic, work, say)
    run.note_load("end")
    return {
        "schema": SCHEMA,
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "load_average": run.loads,
        "seconds": round(time.monotonic() - started, 1),
        "plan": {"quick": bool(args.quick), "traffic": traffic.description, "refunds": plan.refunds,
                 "image_requests": plan.image_requests, "plain_requests": plan.plain_requests,
                 "half_seconds": plan.half_seconds, "partitions": plan.partitions, "phases": sorted(plan.phases),
                 "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("REFUNDGUARD_")}},
        "figures": {f.key: f.as_json() for f in run.figures},
        "detail": run.detail,
    }


def _printer(args: argparse.Namespace) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not args.quiet:
            print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return say


def _cpu_phase(run: Run, traffic: Traffic, say: Callable[[str], None]) -> None:
    say("CPU per evidence image: running every request's image job in-process")
    jobs, problems = measure_image_cpu(traffic)
    within = cpu_figures(jobs, TARGET_MAX_MEGAPIXELS)
    every = cpu_figures(jobs)
    megapixels = [j.evidence_megapixels for j in jobs if j.evidence_images]
    run.detail["cpu"] = {"within_2mp": within, "all": every, "jobs": len(jobs), "problems": problems,
                         "evidence_megapixels": {"median": percentile(megapixels, 50), "max": max(megapixels,
                                                                                                  default=0.0)}}
    for stage, figures in within.items():
        if stage == TOTAL:
            continue
        run.add(Figure(f"cpu.{stage}.median", f"CPU {stage} per evidence image, median", figures["median_ms"], "ms",
                       higher_is_better=False))
        run.add(Figure(f"cpu.{stage}.p95", f"CPU {stage} per evidence image, p95", figures["p95_ms"], "ms",
                       higher_is_better=False))
    total = within.get(TOTAL, {})
    n = int(total.get("n", 0))
    run.add(Figure("cpu.total.median", f"CPU all image work per evidence image (<= 2 MP, n={n}), median",
                   total.get("median_ms"), "ms", f"<= {TARGET_CPU_MS_PER_IMAGE:g}",
                   total.get("median_ms", math.inf) <= TARGET_CPU_MS_PER_IMAGE, False))
    run.add(Figure("cpu.total.p95", "CPU all image work per evidence image (<= 2 MP), p95", total.get("p95_ms"),
                   "ms", higher_is_better=False))
    run.add(Figure("cpu.total.mean", "CPU all image work per evidence image (<= 2 MP), mean", total.get("mean_ms"),
                   "ms", higher_is_better=False, note="capacity: cores x 1000 / mean = images/s"))


def _cpu_figures(run: Run, prefix: str, label: str, result: LoadResult, workers: Sequence[str]) -> None:
    """Where the CPU went per decision: the worker processes (with pool children), the broker, and
    the co-tenants of this machine (as cores busy on average during the run)."""
    if not result.received:
        return
    worker_ms = sum(result.cpu.get(w, 0.0) for w in workers) * 1000 / result.received
    run.add(Figure(f"{prefix}.worker_cpu_ms", f"{label}: worker CPU per decision (with pool children)", worker_ms,
                   "ms", higher_is_better=False, note="1000 / this = decisions/s one core could do"))
    run.add(Figure(f"{prefix}.broker_cpu_ms", f"{label}: broker CPU per decision", result.cpu.get("broker", 0.0)
                   * 1000 / result.received, "ms", higher_is_better=False))
    span = max(result.seconds, 1e-3)
    run.add(Figure(f"{prefix}.others_cores", f"{label}: other processes on the machine (cores busy)",
                   result.cpu.get("others", 0.0) / span, "core",
                   note=f"runqueue wait of the worker {sum(result.runqueue_wait.get(w, 0.0) for w in workers):.1f} s"))


def _load_phases(run: Run, plan: Plan, traffic: Traffic, work: Path, say: Callable[[str], None]) -> None:
    from streams.broker import EmbeddedBroker, create_topics, free_port
    from streams.simulate.traffic import serve_directory

    image_port = free_port()
    base_url = f"http://127.0.0.1:{image_port}"
    server = serve_directory(traffic.root, "127.0.0.1", image_port)
    rss: dict[str, dict[str, Any]] = {}
    workers: list[Worker] = []
    try:
        with EmbeddedBroker(log_path=work / "broker.log") as broker:
            bootstrap = broker.bootstrap
            broker_tree = {"broker": broker._process.pid} if broker._process else {}
            say(f"embedded broker on {bootstrap}; images served at {base_url}")

            def scenario(name: str) -> Scenario:
                s = Scenario(name, plan.partitions)
                create_topics(bootstrap, [s.requests_topic, s.decisions_topic], s.partitions)
                return s

            def up(*started: Worker) -> None:
                workers.extend(started)
                for w in started:
                    w.wait_ready()
                time.sleep(1.0)  # a member that joined may start another rebalance: wait it out
                for w in workers:
                    w.wait_ready()

            def down(*stopped: Worker) -> None:
                for w in stopped:
                    w.stop()
                    workers.remove(w)

            def meter(*named: Worker) -> CpuMeter:
                return CpuMeter({**{w.name: w.pid for w in named}, **broker_tree})

            def messages(count: int, tag: str, images: bool) -> list[tuple[bytes, bytes]]:
                return clone_requests(traffic.requests, count, tag, base_url if images else None)

            def full_and_half(s: Scenario, w: Worker, images: bool, label: str, target: float,
                              most: int, warmup: int) -> LoadResult:
                tag = "i" if images else "p"
                warm = drive(bootstrap, s, messages(warmup, f"w{tag}", images))
                # With images the warm-up includes the pool's cold start: its rate says little; the
                # count is fixed (and small enough). Without, the count is sized to the machine.
                count = most if images else full_load_size(warm, plan.full_seconds, most, min(most, warmup))
                say(f"{label}: warm-up {warm.received / max(warm.seconds, 1e-3):.1f}/s; {count} requests as fast "
                    "as possible")
                run.note_load(s.name)
                full = drive(bootstrap, s, messages(count, f"f{tag}", images), meter=meter(w))
                half_rate = full.rate / 2
                half_count = max(10, min(most, int(half_rate * plan.half_seconds)))
                say(f"  {full.rate:.1f}/s; half load: {half_count} requests at {half_rate:.1f}/s")
                half = drive(bootstrap, s, messages(half_count, f"h{tag}", images), rate=half_rate, meter=meter(w))
                rss[s.name] = peak_rss_mb(w.pid)
                run.detail[s.name] = {"full": full.summary(), "half": half.summary(), "rss": rss[s.name]}
                prefix = "images" if images else "plain"
                run.rate_figures(prefix, label, full, half, target)
                _cpu_figures(run, prefix, label, full, [w.name])
                return full

            if "images" in plan.phases:
                s = scenario("images")
                w = service_worker("worker-images", s, bootstrap, work, images=True, alone=True)
                up(w)
                full_and_half(s, w, True, "full scorer set", TARGET_RATE_IMAGES, plan.image_requests,
                              plan.warmup_images)
                down(w)

            plain_full: LoadResult | None = None
            if plan.phases & {"plain", "scale"}:
                s = scenario("plain")
                one = service_worker("worker-plain", s, bootstrap, work, images=False,
                                     alone="scale" not in plan.phases)
                up(one)
                plain_full = full_and_half(s, one, False, "image scorers off", TARGET_RATE_NO_IMAGES,
                                           plan.plain_requests, plan.warmup_plain)

                if "scale" in plan.phases:
                    # The same group and topics: a second member takes half the partitions.
                    two = service_worker("worker-plain-2", s, bootstrap, work, images=False)
                    up(two)
                    drive(bootstrap, s, messages(plan.warmup_plain, "ws", False))
                    say(f"two workers, image scorers off: {plain_full.sent} requests as fast as possible")
                    run.note_load("scale")
                    pair = drive(bootstrap, s, messages(plain_full.sent, "fs", False), meter=meter(one, two))
                    rss["plain-2"] = peak_rss_mb(two.pid)
                    ratio = pair.rate / plain_full.rate
                    say(f"  {pair.rate:.0f}/s with two workers: {ratio:.2f}x one")
                    run.detail["scale"] = {"full": pair.summary(), "rss_second": rss["plain-2"]}
                    run.add(Figure("scale.two.rate", "two workers, image scorers off: decisions/s", pair.rate, "/s",
                                   higher_is_better=True, note=f"{pair.received}/{pair.sent} decided"))
                    run.add(Figure("scale.ratio", "two workers / one worker (image scorers off)", ratio, "x",
                                   f">= {TARGET_SCALE_OUT:g}", ratio >= TARGET_SCALE_OUT, True))
                    _cpu_figures(run, "scale", "two workers", pair, [one.name, two.name])
                    down(two)
                down(one)

            if "passthrough" in plan.phases:
                s = scenario("passthrough")
                w = passthrough_worker("passthrough", s, bootstrap, work)
                up(w)
                warm = drive(bootstrap, s, messages(plan.warmup_plain, "wt", False))
                count = full_load_size(warm, plan.full_seconds, plan.plain_requests, plan.warmup_plain)
                say(f"pass-through agent: {count} requests as fast as possible")
                run.note_load("passthrough")
                through = drive(bootstrap, s, messages(count, "ft", False), meter=meter(w))
                down(w)
                say(f"  {through.rate:.0f}/s")
                run.detail["passthrough"] = {"full": through.summary()}
                run.add(Figure("passthrough.full.rate", "pass-through agent: messages/s at full load",
                               through.rate, "/s", higher_is_better=True,
                               note=f"{through.received}/{through.sent} through"))
                _cpu_figures(run, "passthrough", "pass-through", through, [w.name])
                if plain_full is not None:
                    run.add(Figure("plain.vs_passthrough", "image scorers off / pass-through (decisions/s ratio)",
                                   plain_full.rate / through.rate, "x", higher_is_better=True))
    finally:
        for w in list(workers):
            w.stop()
        server.shutdown()
    for name, figures in rss.items():
        run.add(Figure(f"rss.{name}", f"peak RSS of {name} worker + its {int(figures['processes']) - 1} "
                       "child processes", figures["total_mb"], "MB", f"<= {TARGET_RSS_MB:g}",
                       figures["total_mb"] <= TARGET_RSS_MB, False,
                       f"worker {figures['worker_mb']:.0f} MB + children {figures['children_mb']:.0f} MB"))


# ------------------------------------------------------------------ output


def render(result: dict[str, Any], changes: dict[str, str]) -> list[str]:
    m = result["machine"]
    lines = [f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gb']} GB RAM, Python {m['python']}",
             "load average (1/5/15 min): " + "; ".join(f"{phase} {' '.join(f'{x:.2f}' for x in values)}"
                                                    for phase, values in result["load_average"].items()),
             f"traffic: {result['plan']['traffic']}; run took {result['seconds']:.0f} s", ""]
    header = (f"{'figure':62s} {'value':>9s} {'unit':4s} {'target':>8s} {'status':7s} {'vs previous':14s} "
              "note")
    lines += [header, "-" * (len(header) + 30)]
    for key, f in result["figures"].items():
        value = "n/a" if f["value"] is None else f"{f['value']:.1f}" if abs(f["value"]) < 1e5 else f"{f['value']:.0f}"
        status = "" if f["met"] is None else "met" if f["met"] else "NOT MET"
        lines.append(f"{f['label'][:62]:62s} {value:>9s} {f['unit']:4s} {f['target']:>8s} {status:7s} "
                     f"{changes.get(key, ''):14s} {f['note']}".rstrip())
    return lines


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    previous: dict[str, Any] | None = None
    if out.exists():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(out.read_text())
    try:
        result = run_bench(args)
    except BenchError as exc:
        print(f"refundguard bench: error: {exc}", file=sys.stderr)
        return 1
    changes = compare(previous, result)
    for line in render(result, changes):
        print(line)
    if previous is not None:
        print(f"\n(compared with {out}, run at {previous.get('at', '?')})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    print(f"figures written to {out}")
    missed = [f["label"] for f in result["figures"].values() if f["met"] is False]
    return 3 if missed and args.strict else 0


def add_parser(sub: Any) -> None:
    """Register ``bench`` on the CLI's subparsers."""
    b = sub.add_parser("bench", help="measure CPU per image, decisions/s, latency, RSS and scale-out; "
                                     "print them with their targets and compare with the last run")
    b.add_argument("--quick", action="store_true", help="smaller runs (about a minute and a half)")
    b.add_argument("--cases", type=Path, help="a casegen directory (events.jsonl, images/) instead of simulated "
                                              "traffic")
    b.add_argument("--refunds", type=int, help="simulated refunds to generate (default 80, quick 40)")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--image-requests", type=int, help="requests at full load with the full scorer set "
                                                      "(default 200, quick 40)")
    b.add_argument("--requests", type=int, help="most requests at full load with image scorers off, the "
                                                "pass-through and two workers; fewer if the warm-up shows they "
                                                "would take over 30 s (quick: 6 s) (default 20000, quick 3000)")
    b.add_argument("--half-seconds", type=float, help="length of each half-load run (default 20, quick 8)")
    b.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    b.add_argument("--workdir", type=Path, help="keep generated traffic, logs and state here (reused on the "
                                                "next run)")
    b.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="JSON results; compared with first if present")
    b.add_argument("--strict", action="store_true", help="exit 3 when a target is not met")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_passthrough"]:  # the pass-through agent's own process
        return run_passthrough()
    p = argparse.ArgumentParser(prog="python -m streams.bench")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = p.parse_args(["bench", *argv])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
