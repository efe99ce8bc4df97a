"""Faust / aiokafka workarounds: Tansu's fetch and end-offset quirks (``short_fetch_wait``,
``_fetched_highwaters``), and surviving a broker that comes back without its data.

A broker that restarts empty (the embedded Tansu keeps everything in memory; a real
cluster whose log directories were lost looks the same) leaves the worker with state that
is newer than anything the broker holds: its RocksDB tables, the changelog offsets they
recorded, the offsets it was about to commit. Faust assumes the broker is the reference,
so without these patches the worker either crashed (``ConsistencyError``: the table's
persisted changelog offset is past the new, empty changelog's end) or, had that check been
switched off, would have skipped the first records of the new changelog and of every
input partition (stale offsets committed into the new log).

What the worker does instead, all in this module:

* its clients never auto-create topics (``allow_auto_topic_creation=False``): a broker
  that auto-creates (Tansu does, whatever its config) would otherwise re-create the
  worker's topics with its own default partition count the moment the worker reconnects;
* when the group is rejoined it re-creates, with the right partitions, every topic the
  worker creates at start (the contract topics, ``<app>-by-buyer``,
  ``<app>-outcomes-applied``, the table changelogs) that the broker no longer has;
* commits made after the coordinator forgot this member (generation reset to -1) are
  dropped: their offsets number a log that no longer exists;
* table recovery that finds a persisted offset past a changelog's end keeps the local
  state, reads the new changelog from its start, and re-publishes the partition's local
  state into it, so a later restart with an empty data dir recovers everything again.
  The in-memory global tables (taints, evidence index) are re-published with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("refundguard.kafka")

# Per app id: the topics the worker creates at start (see streams.app.topic_names).
_WORKER_TOPICS: dict[str, tuple[str, Callable[[], Iterable[str]], int]] = {}


def install(app_id: str, bootstrap: str, worker_topics: Callable[[], Iterable[str]], partitions: int, *,
            fetch_max_wait_ms: int) -> None:
    """Install every patch of this module (idempotent) and register the app's own topics."""
    _WORKER_TOPICS[app_id] = (bootstrap, worker_topics, partitions)
    short_fetch_wait(fetch_max_wait_ms)
    _fetched_highwaters(fetch_max_wait_ms)
    _no_auto_create()
    _recreate_lost_topics()
    _no_commits_without_membership()
    _no_committed_offsets_past_the_end()
    _recover_from_lost_changelogs()


def short_fetch_wait(max_wait_ms: int) -> None:
    """Faust hard-codes fetch_max_wait_ms=1500 for its consumer. Brokers that answer a
    multi-partition fetch only when the wait expires (Tansu does) then add up to 1.5 s
    per hop; measured here: ~0.5-1.2 s per hop at 1500 ms, ~15 ms at 100 ms."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, "_refundguard_wait", None) == max_wait_ms:
        return

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms
        return consumer

    create._refundguard_wait = max_wait_ms  # type: ignore[attr-defined]
    create.__wrapped__ = getattr(original, "__wrapped__", original)  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._create_worker_consumer = create


def _fetched_highwaters(max_wait_ms: int) -> None:
    """Table recovery reads a changelog up to its end offset, which Faust takes from
    ListOffsets. Tansu 0.6's memory storage answers that with the newest *batch's* base
    offset + 1 (offsets 0..11 written as one batch are listed as ending at 1, not 12), so
    recovery stopped short and a restart with a RocksDB offset past that end failed with
    ConsistencyError. A fetch response carries the true high watermark: read one record
    just before the reported end and take the larger value. On a correct broker this is
    one extra fetch per recovery and changes nothing."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread._highwaters
    if getattr(original, "_refundguard_fetched", False):
        return

    async def highwaters(self: Any, partitions: list[Any]) -> Any:
        ends = dict(await original(self, partitions))
        probed = [tp for tp, end in ends.items() if end]
        if not probed or self.consumer.in_transaction:
            return ends
        probe = self._create_client_consumer(self.transport)
        probe._fetch_max_wait_ms = max_wait_ms
        await probe.start()
        try:
            probe.assign(probed)
            for tp in probed:
                probe.seek(tp, ends[tp] - 1)
            pending = set(probed)
            deadline = time.monotonic() + self.app.conf.broker_request_timeout
            while pending and time.monotonic() < deadline:
                await probe.getmany(*pending, timeout_ms=200)
                for tp in list(pending):
                    high = probe.highwater(tp)
                    if high is not None:
                        ends[tp] = max(ends[tp], high)
                        pending.discard(tp)
            if pending:
                log.warning("no high watermark fetched for %s; using the listed end offsets", sorted(pending))
        finally:
            await probe.stop()
        return ends

    highwaters._refundguard_fetched = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._highwaters = highwaters


def _no_auto_create() -> None:
    """aiokafka asks every metadata request to auto-create the topics it names (v4+ requests
    default to True). The worker creates its topics itself, with their partition counts."""
    from aiokafka.protocol import metadata

    original = metadata.MetadataRequest.__init__
    if getattr(original, "_refundguard", False):
        return

    def init(self: Any, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None) -> None:
        original(self, topics, False if allow_auto_topic_creation is None else allow_auto_topic_creation)

    init._refundguard = True  # type: ignore[attr-defined]
    metadata.MetadataRequest.__init__ = init  # type: ignore[method-assign]


def wanted_topics(app: Any) -> dict[str, tuple[int, dict[str, str]]]:
    """Every topic this worker creates at start: name -> (partitions, config)."""
    _, worker_topics, partitions = _WORKER_TOPICS.get(app.conf.id, ("", lambda: (), 0))
    default = partitions or app.conf.topic_partitions
    wanted: dict[str, tuple[int, dict[str, str]]] = {}
    for table in app.tables.values():
        topic = table.changelog_topic
        config = {"cleanup.policy": "compact"} if topic.compacting else {}
        wanted[topic.get_topic_name()] = (topic.partitions or table.partitions or default, config)
    for channel in app.topics:
        if getattr(channel, "internal", False):
            for name in channel.topics:
                wanted.setdefault(name, (channel.partitions or default, {}))
    for name in worker_topics():
        wanted.setdefault(name, (default, {}))
    return wanted


def _recreate_lost_topics() -> None:
    """Before rejoining the group (the revoke callback runs first), make sure the topics the
    worker created at start still exist, so the new assignment covers them."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread.on_partitions_revoked
    if getattr(original, "_refundguard", False):
        return

    async def on_partitions_revoked(self: Any, revoked: set[Any]) -> None:
        if revoked:
            try:
                await _create_missing(self.app, self._ensure_consumer()._client)
            except Exception:  # never break a rebalance over this; the next one retries
                log.exception("could not check or re-create the worker's topics")
        await original(self, revoked)

    on_partitions_revoked._refundguard = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread.on_partitions_revoked = on_partitions_revoked  # type: ignore[method-assign]


async def _create_missing(app: Any, client: Any) -> None:
    from streams.broker import create_topics

    if app.conf.id not in _WORKER_TOPICS:  # an app that did not install(): not ours to manage
        return
    cluster = await client.fetch_all_metadata()
    existing = set(cluster.topics())
    missing = {name: spec for name, spec in wanted_topics(app).items() if name not in existing}
    if not missing:
        return
    bootstrap = _WORKER_TOPICS[app.conf.id][0]
    log.warning("the broker lost %d of the worker's topics; re-creating them: %s", len(missing), sorted(missing),
                extra={"event": "topics_recreated", "topics": sorted(missing)})
    groups: dict[tuple[int, tuple[tuple[str, str], ...]], list[str]] = {}
    for name, (partitions, config) in missing.items():
        groups.setdefault((partitions, tuple(sorted(config.items()))), []).append(name)
    for (partitions, config), names in groups.items():
        await asyncio.to_thread(create_topics, bootstrap, names, partitions, dict(config))
    await client.force_metadata_update()


def _no_commits_without_membership() -> None:
    """After the coordinator forgot this member (its heartbeat answered UNKNOWN_MEMBER_ID:
    the broker restarted empty, or the session expired), aiokafka resets the generation to
    -1, and Faust still commits what it acked while revoking. Those offsets count records
    of the old log: an empty broker would store them and the rejoined group would skip
    that many new records. Not committing only means re-processing (at least once)."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread._commit
    if getattr(original, "_refundguard", False):
        return

    async def commit(self: Any, offsets: Any) -> bool:
        coordinator = getattr(self._ensure_consumer(), "_coordinator", None)
        if coordinator is not None and coordinator.generation == -1 and offsets:
            log.warning("not committing %d offsets: this member left the group (broker restart or "
                        "session expiry); they will be processed again", len(offsets))
            return False
        return bool(await original(self, offsets))

    commit._refundguard = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._commit = commit  # type: ignore[method-assign]


def _no_committed_offsets_past_the_end() -> None:
    """After a rebalance Faust seeks every input partition to its committed offset. A
    committed offset past the partition's end numbers a log the broker no longer has (a
    commit that reached the empty broker before the group noticed it was new); seeking
    there would skip that many new records, silently. Read such a partition from its start."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread.seek_to_committed
    if getattr(original, "_refundguard", False):
        return

    async def seek_to_committed(self: Any) -> Any:
        committed = dict(await original(self))
        ahead = [tp for tp, offset in committed.items() if offset]
        if not ahead:
            return committed
        ends = await self.highwaters(*ahead)  # true ends (see _fetched_highwaters)
        past = {tp: committed[tp] for tp in ahead if ends.get(tp) is not None and committed[tp] > ends[tp]}
        if past:
            consumer = self._ensure_consumer()
            await self.call_thread(consumer.seek_to_beginning, *past)
            for tp, offset in past.items():
                log.warning("committed offset %d of %s[%d] is past its end %d: the broker lost the log; "
                            "reading it from the start", offset, tp.topic, tp.partition, ends[tp],
                            extra={"event": "committed_offset_lost", "topic": tp.topic, "partition": tp.partition})
                committed[tp] = None
        return committed

    seek_to_committed._refundguard = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread.seek_to_committed = seek_to_committed  # type: ignore[method-assign]


def _recover_from_lost_changelogs() -> None:
    """Faust raises ConsistencyError when a table's persisted changelog offset is past the
    changelog's end. Here that means the broker lost the changelog, and the local state
    is the only copy: keep it, read the new changelog from its start (it holds only newer
    writes), and re-publish the partition's state into it."""
    from faust.tables import recovery

    original = recovery.Recovery._build_offsets
    if getattr(original, "_refundguard", False):
        return

    async def build_offsets(self: Any, consumer: Any, tps: set[Any], destination: Any, title: str) -> None:
        await original(self, consumer, tps, destination, title)
        ahead = {tp: destination[tp] for tp in tps if destination.get(tp) is not None and destination[tp] >= 0}
        if not ahead:
            return
        ends = await consumer.highwaters(*ahead)  # true ends (see _fetched_highwaters)
        lost = False
        for tp, offset in ahead.items():
            end = ends.get(tp)
            if end is None or offset < end:
                continue
            table = self.tp_to_table.get(tp)
            republished = 0
            if table is not None and title == "active":
                republished = await _republish(self.app, table, tp)
            if table is not None:
                # Not past the end any more: the next recovery reads the new changelog whole.
                table.data.set_persisted_offset(tp, -1)
            destination[tp] = -1
            lost = True
            log.warning("changelog %s[%d] ends at %d but this worker's %s state is at offset %d: the broker lost "
                        "it; keeping the local state, re-published %d keys", tp.topic, tp.partition, end, title,
                        offset, republished,
                        extra={"event": "changelog_lost", "topic": tp.topic, "partition": tp.partition,
                               "republished": republished})

        if lost and title == "active":
            # The broker lost the global tables' changelogs too; every worker holds all of
            # them in memory and writes them back here, in the same rebalance (before any
            # worker processes again), so no newer write can be overwritten by an older one.
            await _republish_global_tables(self.app)

    build_offsets._refundguard = True  # type: ignore[attr-defined]
    recovery.Recovery._build_offsets = build_offsets  # type: ignore[method-assign]


async def _republish(app: Any, table: Any, tp: Any) -> int:
    """Write every key of one RocksDB table partition to its changelog partition, as stored
    (the store keeps the changelog's serialized bytes). In-memory stores keep no offsets,
    so they never get here."""
    store = table.data
    open_db = getattr(store, "_db_for_partition", None)
    if open_db is None:
        return 0
    db = open_db(tp.partition)
    offset_key = store.offset_key
    producer = app.producer
    count = 0
    started = time.monotonic()
    for key, value in db.items():
        if key == offset_key:
            continue
        await producer.send(tp.topic, key, value, tp.partition, None, None)
        count += 1
    await producer.flush()
    log.info("re-published %d keys to %s[%d] in %.2f s", count, tp.topic, tp.partition, time.monotonic() - started)
    return count


async def _republish_global_tables(app: Any) -> None:
    """Write every key of the in-memory global tables (taints, evidence index) back to their
    changelogs, so a worker that starts later with no state still learns them."""
    from faust.tables.globaltable import GlobalTable

    for table in app.tables.values():
        data = getattr(table.data, "data", None)  # the memory store's dict
        if not isinstance(table, GlobalTable) or not isinstance(data, dict):
            continue
        for key, value in list(data.items()):
            table.send_changelog(None, key, value)
        log.info("re-published %d keys of global table %s", len(data), table.name)
    await app.producer.flush()


def broker_reachable(app: Any) -> bool:
    """False while the group coordinator is unknown: the broker is gone (or unreachable)
    and nothing this worker consumes or produces moves. For readiness."""
    try:
        consumer = app.consumer._thread._ensure_consumer()
        return consumer._coordinator.coordinator_id is not None
    except Exception:
        return False
