"""Typed settings, read from ``REFUNDGUARD_*`` environment variables (and ``KAFKA_BOOTSTRAP``).

Every variable is listed in the README's operations section; a test checks
that the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TopicSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFUNDGUARD_TOPIC_", frozen=True)

    requests: str = "refund.requests"
    outcomes: str = "refund.outcomes"
    decisions: str = "refund.decisions"
    dlq: str = "refund.requests.dlq"
    shadow_decisions: str = "refund.decisions.shadow"
    partitions: int = Field(8, ge=1, le=1024, description="partitions for topics the service creates")


class FetchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFUNDGUARD_FETCH_", frozen=True)

    schemes: frozenset[Literal["http", "https", "file", "data"]] = frozenset({"http", "https", "data"})
    allow_private: bool = Field(False, description="allow loopback/private/link-local hosts (tests, dev)")
    file_root: Path | None = Field(None, description="file:// URLs must resolve under this directory")
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="total time for one image, connect to last byte")
    max_bytes: int = Field(15 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=10_000, description="decompression-bomb guard")
    max_redirects: int = Field(3, ge=0, le=10)
    concurrency_per_request: int = Field(4, ge=1, le=32)
    concurrency_total: int = Field(64, ge=1, le=1024)
    reference_cache_entries: int = Field(512, ge=0)


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFUNDGUARD_SCORING_", frozen=True)

    image_workers: int = Field(0, ge=0, le=64, description="process pool size; 0 = number of CPUs")
    image_timeout_s: float = Field(20.0, gt=0, description="budget for all image scorers of one request")
    behaviour_timeout_s: float = Field(1.0, gt=0)
    disabled: frozenset[str] = Field(frozenset(), description="scorer names to switch off")
    working_side: int = Field(768, ge=256, le=4096,
                              description="longest side images are decoded to at most (less if no scorer needs it)")
    batch_size: int = Field(16, ge=1, le=1000)
    batch_within_s: float = Field(0.05, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REFUNDGUARD_", frozen=True, env_nested_delimiter="__", populate_by_name=True
    )

    bootstrap: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "REFUNDGUARD_BOOTSTRAP"),
        description="Kafka bootstrap servers, host:port[,host:port]",
    )
    app_id: str = Field("refundguard", description="Faust app id = consumer group")
    data_dir: Path = Field(Path(".refundguard"), description="Faust table state (RocksDB)")
    store: Literal["rocksdb", "memory"] = "rocksdb"
    policy_file: Path | None = Field(None, description="policy TOML; default: the built-in policy")
    shadow_policy_file: Path | None = None
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535, description="metrics and health endpoints")
    max_message_bytes: int = Field(1_048_576, ge=1024, description="larger requests are dead-lettered")
    dlq_max_value_bytes: int = Field(512 * 1024, ge=0, description="raw bytes copied into a DLQ record")
    rebalance_timeout_s: float = Field(5.0, gt=0, le=300, description="how long a group join waits for members")
    group_instance_id: str | None = Field(None, description="static group membership (e.g. the pod name)")
    consumer_fetch_max_wait_ms: int = Field(100, ge=0, le=5000, description="longest a fetch waits for data")
    producer_linger_ms: int = Field(5, ge=0, le=1000,
                                    description="how long a send waits to share a produce request with others")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    topics: TopicSettings = Field(default_factory=TopicSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)

    @field_validator("bootstrap")
    @classmethod
    def _host_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().removeprefix("kafka://").rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap server {server!r} is not host:port")
        return value

    @property
    def broker_url(self) -> str:
        return ";".join("kafka://" + s.strip().removeprefix("kafka://") for s in self.bootstrap.split(","))
