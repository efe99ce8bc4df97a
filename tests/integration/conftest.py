"""Integration fixtures: the embedded broker on a free loopback port and real worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams.broker import EmbeddedBroker, free_port
from streams.simulate.traffic import serve_directory

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as b:
        yield b


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    web_port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def start_worker(bootstrap: str, work: Path, name: str = "worker", **env: str) -> Worker:
    web_port = free_port()
    log = work / f"{name}.log"
    full_env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": bootstrap,
        "REFUNDGUARD_WEB_PORT": str(web_port),
        "REFUNDGUARD_DATA_DIR": str(work / f"{name}-state"),
        "REFUNDGUARD_FETCH_ALLOW_PRIVATE": "true",
        "REFUNDGUARD_TOPIC_PARTITIONS": "4",
        "REFUNDGUARD_SCORING_IMAGE_WORKERS": "1",
        "REFUNDGUARD_LOG_LEVEL": "INFO",
        **env,
    }
    process = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=full_env,
                               stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker = Worker(process, web_port, log, full_env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{worker.log_tail()}")
        with contextlib.suppress(OSError):
            if worker.get("/health/ready")[0] == 200:
                return worker
        time.sleep(0.3)
    worker.stop()
    raise AssertionError(f"worker not ready in time:\n{worker.log_tail()}")


@pytest.fixture
def worker_factory(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def make(name: str = "worker", **env: str) -> Worker:
        w = start_worker(broker.bootstrap, tmp_path, name, **env)
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


class Kafka:
    """A producer and a reader of the output topics, positioned before anything is sent."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
                                      max_request_size=4 * 1024 * 1024)
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      consumer_timeout_ms=200, max_partition_fetch_bytes=8 * 1024 * 1024)
        parts = []
        for topic in topics:
            deadline = time.monotonic() + 30
            while not self.consumer.partitions_for_topic(topic):
                assert time.monotonic() < deadline, f"topic {topic} missing"
                self.consumer.poll(timeout_ms=100)
            parts += [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic)]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.records: dict[str, list[Any]] = {t: [] for t in topics}

    def send(self, topic: str, key: str | bytes | None, value: bytes | dict[str, Any]) -> None:
        raw = json.dumps(value).encode() if isinstance(value, dict) else value
        k = key.encode() if isinstance(key, str) else key
        self.producer.send(topic, key=k, value=raw)
        self.producer.flush()

    def collect(self, topic: str, until: Callable[[list[Any]], bool], timeout_s: float = 60.0) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while not until(self.records[topic]):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {topic}: {len(self.records[topic])} records")
            for records in self.consumer.poll(timeout_ms=200).values():
                for r in records:
                    self.records[r.topic].append(r)
        return self.records[topic]

    def close(self) -> None:
        self.producer.close(timeout=5)
        self.consumer.close()


@pytest.fixture
def kafka_factory(broker: EmbeddedBroker) -> Iterator[Callable[[list[str]], Kafka]]:
    made: list[Kafka] = []

    def make(topics: list[str]) -> Kafka:
        k = Kafka(broker.bootstrap, topics)
        made.append(k)
        return k

    yield make
    for k in made:
        k.close()


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    (root / "images").mkdir(parents=True)
    port = free_port()
    server = serve_directory(root, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}", root
    server.shutdown()
