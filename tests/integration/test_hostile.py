"""Hostile input through the real broker and worker: mutated events and hostile evidence images.

One broker and one worker serve the whole module (starting them is most of the cost).
The worker runs with the private-address guard ON (REFUNDGUARD_FETCH_ALLOW_PRIVATE=false);
a sitecustomize in its environment lets exactly 127.0.0.2 count as a public address, so
images served there stand in for a public host, while 127.0.0.1, localhost and 10.0.0.1
stay forbidden. That is what makes the redirect case testable: the first hop must pass
the guard for the redirect target to be checked at all.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from streams.broker import EmbeddedBroker
from streams.contract import ContractError, parse_request
from streams.simulate import images as sim
from tests.conftest import DATA, ROOT
from tests.integration.conftest import Kafka, Worker, start_worker
from tests.scorers import test_prepare as hostile

pytestmark = pytest.mark.integration

TOPICS = ["refund.decisions", "refund.requests.dlq"]
PUBLIC_STAND_IN = "127.0.0.2"
MAX_FETCH_BYTES = 2 * 1024 * 1024
MAX_MESSAGE_BYTES = 1_048_576  # the worker's default REFUNDGUARD_MAX_MESSAGE_BYTES
RSS_LIMIT_MB = 1024

SITECUSTOMIZE = f'''
"""Test only: {PUBLIC_STAND_IN} stands in for a public host; every other address is judged as usual."""
import ipaddress

import streams.fetch as _fetch

_real_is_public = _fetch._is_public


def _is_public(address):
    return str(ipaddress.ip_address(address)) == "{PUBLIC_STAND_IN}" or _real_is_public(address)


_fetch._is_public = _is_public
'''


# ------------------------------------------------------------------ servers


class _Routes(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]] = {}

    def do_GET(self) -> None:
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the worker hung up: often the point
            route(self)

    def log_message(self, *args: Any) -> None:
        pass


def _file(body: bytes, content_type: str = "image/jpeg") -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def send(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return send


def _redirect(location: str) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def send(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return send


def _trickle(h: http.server.BaseHTTPRequestHandler) -> None:
    """A valid-looking answer whose body comes at 256 B/s: only a total deadline stops it."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Content-Length", "100000")
    h.end_headers()
    for _ in range(60):
        h.wfile.write(b"\xff" * 64)
        h.wfile.flush()
        time.sleep(0.25)


def _endless_unsized(h: http.server.BaseHTTPRequestHandler) -> None:
    """No Content-Length (HTTP/1.0, body until close): only counting the bytes read stops it."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.end_headers()
    chunk = b"\xff\xd8" + os.urandom(64 * 1024 - 2)
    for _ in range(3 * MAX_FETCH_BYTES // len(chunk)):
        h.wfile.write(chunk)


@dataclass
class ConnectionCounter:
    """A loopback listener that only counts connections: a forbidden address must never be dialled."""

    port: int = 0
    accepted: int = 0
    _sock: socket.socket = field(default_factory=socket.socket)

    def start(self) -> ConnectionCounter:
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while self._sock.fileno() != -1:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


# ------------------------------------------------------------------ memory


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _hwm_mb(pid: int) -> float | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


class PeakRss:
    """Samples the worker's and its descendants' peak RSS (VmHWM) while running.

    Children come and go (the pool is recycled), so each one's peak is remembered;
    the figure is the worker's peak plus every descendant's peak: an upper bound.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        tree = _proc_children()
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            todo += tree.get(pid, [])
            hwm = _hwm_mb(pid)
            if hwm is not None:
                self.peaks[pid] = max(hwm, self.peaks.get(pid, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def total_mb(self) -> float:
        return sum(self.peaks.values())


# ------------------------------------------------------------------ fixtures


@dataclass
class Env:
    worker: Worker
    kafka: Kafka
    base: str  # http://127.0.0.2:port
    counter: ConnectionCounter
    routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("hostile")
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    handler = type("Routes", (_Routes,), {"routes": {}})
    server = http.server.ThreadingHTTPServer((PUBLIC_STAND_IN, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    counter = ConnectionCounter().start()

    rng = np.random.default_rng(11)
    product = sim.make_product(rng, 0)
    handler.routes["/listing.jpg"] = _file(sim.encode(sim.listing_photo(product, rng), "JPEG"))
    handler.routes["/genuine.jpg"] = _file(sim.encode(sim.buyer_photo(product, rng, "crack"), "JPEG"))

    # The tree under test before the installed one: sitecustomize imports streams.fetch before
    # ``python -m`` puts the working directory on the path.
    python_path = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        worker = start_worker(
            broker.bootstrap, work, "hostile",
            PYTHONPATH=python_path,
            REFUNDGUARD_FETCH_ALLOW_PRIVATE="false",
            REFUNDGUARD_FETCH_MAX_BYTES=str(MAX_FETCH_BYTES),
            REFUNDGUARD_FETCH_READ_TIMEOUT_S="2",
        )
        kafka = Kafka(broker.bootstrap, TOPICS)
        try:
            yield Env(worker, kafka, f"http://{PUBLIC_STAND_IN}:{server.server_address[1]}", counter,
                      handler.routes)
        finally:
            kafka.close()
            worker.stop()
            server.shutdown()
            counter.close()


def valid_request(env: Env, refund_id: str) -> dict[str, Any]:
    r = json.loads((DATA / "example-request.json").read_text())
    r.update(refund_id=refund_id, order_id=f"OD-{refund_id}", buyer_id=f"BY-{refund_id}")
    r["evidence"] = [{"image_id": "EV-1", "url": f"{env.base}/genuine.jpg"}]
    r["reference_images"] = [{"image_id": "LS-1", "url": f"{env.base}/listing.jpg", "source": "listing"}]
    return r


def alive(worker: Worker) -> None:
    assert worker.process.poll() is None, f"the worker died:\n{worker.log_tail()}"
    assert worker.get("/health/live")[0] == 200


def worker_errors(worker: Worker, last: int = 3) -> str:
    """The worker's last few ERROR records, each cut short (its tail is mostly Faust noise)."""
    lines = [line for line in worker.log.read_text(errors="replace").splitlines() if '"level": "ERROR"' in line]
    return "\n".join(line[:1500] for line in lines[-last:])


def decisions_by_key(kafka: Kafka) -> Counter[bytes]:
    return Counter(r.key for r in kafka.records["refund.decisions"])


# ------------------------------------------------------------------ hostile images


def test_hostile_images_are_held_with_a_named_reason(env: Env) -> None:
    # How I checked this fails without each protection (on a copy of the tree, streams/fetch.py edited):
    # - no byte limit (Content-Length check and the count in _read_capped off): HI-big and
    #   HI-unsized were fetched whole and held IMAGE_UNREADABLE, not IMAGE_TOO_BIG.
    # - no total deadline (aiohttp total=None, per-read timeout only, no check in _read_capped):
    #   HI-trickle ran 15 s and was held IMAGE_FETCH_FAILED, not IMAGE_FETCH_TIMEOUT.
    # - _check_literal_host a no-op: the redirects to 10.0.0.1 and 127.0.0.1 and the loopback URL
    #   were dialled (10.0.0.1 even answered "HTTP 404" in the sandbox).
    # - the guarded resolver letting every address through (alone): HI-to-localhost was dialled.
    # - the decoding guards: see tests/scorers/test_prepare.py.
    loopback = f"http://127.0.0.1:{env.counter.port}"
    served = {
        "/bomb.png": _file(hostile.bomb_png(20_000, 10_000), "image/png"),  # complete file, 24 KB, 200 Mpx
        "/truncated.jpg": _file(hostile.truncated_jpeg()),
        "/text-bomb.png": _file(hostile.text_bomb_png(), "image/png"),
        "/login-page.jpg": _file(hostile.HTML_PAGE, "text/html"),
        "/drawing.svg": _file(hostile.SVG_FILE, "image/svg+xml"),
        "/animated.gif": _file(hostile.animated_gif(side=32), "image/gif"),
        "/big.jpg": _file(b"\xff\xd8" + os.urandom(MAX_FETCH_BYTES + 100_000)),
        "/unsized.jpg": _endless_unsized,
        "/trickle.jpg": _trickle,
        "/to-private": _redirect("http://10.0.0.1/x.jpg"),
        "/to-loopback": _redirect(f"{loopback}/x.jpg"),
        "/to-localhost": _redirect(f"http://localhost:{env.counter.port}/x.jpg"),
    }
    env.routes.update(served)
    cases = {
        "HI-bomb": ("/bomb.png", "IMAGE_TOO_LARGE"),
        "HI-truncated": ("/truncated.jpg", "IMAGE_CORRUPT"),
        "HI-text-bomb": ("/text-bomb.png", "IMAGE_TOO_LARGE"),
        "HI-html": ("/login-page.jpg", "IMAGE_UNREADABLE"),
        "HI-svg": ("/drawing.svg", "IMAGE_FORMAT_UNSUPPORTED"),
        "HI-gif": ("/animated.gif", "IMAGE_FORMAT_UNSUPPORTED"),  # 10,000 frames
        "HI-big": ("/big.jpg", "IMAGE_TOO_BIG"),
        "HI-unsized": ("/unsized.jpg", "IMAGE_TOO_BIG"),
        "HI-trickle": ("/trickle.jpg", "IMAGE_FETCH_TIMEOUT"),
        "HI-to-private": ("/to-private", "IMAGE_URL_FORBIDDEN"),
        "HI-to-loopback": ("/to-loopback", "IMAGE_URL_FORBIDDEN"),
        "HI-to-localhost": ("/to-localhost", "IMAGE_URL_FORBIDDEN"),
        "HI-loopback": (f"{loopback}/x.jpg", "IMAGE_URL_FORBIDDEN"),
    }
    with PeakRss(env.worker.process.pid) as rss:
        started = time.monotonic()
        for refund_id, (path, _) in cases.items():
            request = valid_request(env, refund_id)
            request["evidence"] = [{"image_id": f"EV-{refund_id}",
                                    "url": path if path.startswith("http") else env.base + path}]
            env.kafka.send("refund.requests", refund_id, request)
        # A good request last: the stand-in public host works, and the worker still decides.
        env.kafka.send("refund.requests", "HI-control", valid_request(env, "HI-control"))
        wanted = {k.encode() for k in [*cases, "HI-control"]}
        env.kafka.collect("refund.decisions", lambda _: wanted <= set(decisions_by_key(env.kafka)), 90)
        seconds = time.monotonic() - started
    print(f"\n{len(cases) + 1} requests decided in {seconds:.1f} s; peak RSS worker + pool children: "
          f"{rss.total_mb:.0f} MB ({', '.join(f'{pid}: {mb:.0f}' for pid, mb in sorted(rss.peaks.items()))})")

    decisions = {r.key.decode(): json.loads(r.value) for r in env.kafka.records["refund.decisions"]
                 if r.key in wanted}
    wrong = []  # every case checked, then one assertion: a failure shows all that is off
    for refund_id, (_, code) in cases.items():
        decision = decisions[refund_id]
        named = [r["message"] for r in decision["reasons"] if r["code"] == code]
        # held, for the expected reason, and the reason says which image
        if decision["decision"] != "hold" or not named or f"EV-{refund_id}" not in named[0]:
            reasons = [(r["code"], r["message"][:90]) for r in decision["reasons"]]
            wrong.append(f"{refund_id}: {decision['decision']} {reasons}")
    assert not wrong, "\n".join(wrong)
    assert decisions["HI-control"]["decision"] == "approve", decisions["HI-control"]["reasons"]
    assert env.counter.accepted == 0, f"a forbidden loopback address was connected to {env.counter.accepted} times"
    assert rss.total_mb <= RSS_LIMIT_MB
    alive(env.worker)


# ------------------------------------------------------------------ hostile events


@dataclass(frozen=True)
class Raw:
    """JSON text inserted as is: numbers and tokens Python's json would not write."""

    text: str


DEEP_ARRAY = Raw("[" * 10_000 + "]" * 10_000)
DEEP_OBJECT = Raw('{"a":' * 10_000 + "1" + "}" * 10_000)
ODD_NUMBERS = [Raw("1e400"), Raw("-1e400"), Raw("1e-400"), Raw("-0"), Raw("NaN"), Raw("Infinity"),
               Raw("9" * 5000), 10**100, -(10**100), 2**63, 2**64, 1.5, 0]
ODD_STRINGS = [
    "", " ", "\x00", "\u202egpj.exe", "\u200f\u05e9\u05dc\u05d5\u05dd", "مرحبا", "👩‍👩‍👧‍👦", "🏳️‍🌈" * 300,
    "\ud800", "\udfff", "a\ud83d", "\ufeff", "\uffff", "../../etc/passwd", "%s%n%x", "A" * 128, "A" * 129,
    "A" * 2001, "null", "true", "0",
]
FIELD_STRINGS: dict[str, list[Any]] = {
    "requested_at": ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
                     "0001-01-01T00:00:00+23:59", "2026-02-30T00:00:00Z", "2026-11-23T09:41:07",
                     "2026-11-23T09:41:07.123456789+05:45", "2026-11-23"],
    "value": ["999999999999.9999", "0", "0.0000", "-1", "1e3", "59,90", "059.90", " 59.90", "٥٩"],
    "currency": ["XXX", "cny", "CN", "ＣＮＹ", "EURO"],
    "url": ["file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", "javascript:alert(1)",
            "data:image/png;base64,AAAA", "data:,", "http://[::1]/x.jpg", "http://0x7f000001/x.jpg",
            "gopher://x/", "//no-scheme/x.jpg", "http://" + "a" * 2040],
    "data": ["", "!!!not base64", "AAAA", "=" * 8],
    "kind": ["refund_only ", "REFUND_ONLY", "return_and_refund\x00"],
    "source": ["listing", "shipment", "Listing", "buyer"],
}
FIELD_STRINGS["placed_at"] = FIELD_STRINGS["delivered_at"] = FIELD_STRINGS["account_created_at"] = \
    FIELD_STRINGS["requested_at"]

any_text = st.text(st.characters(), max_size=40)  # any scalar value: RTL, combining marks, emoji, controls
hostile_text = st.one_of(st.sampled_from(ODD_STRINGS), any_text)
# Lone surrogates, which hypothesis's characters() never draws; their own edit, so that they
# (refused by the JSON parser) do not swamp the strings that get through.
lone_surrogate_text = st.tuples(any_text, st.integers(0xD800, 0xDFFF).map(chr), any_text).map("".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from(ODD_NUMBERS), hostile_text)
nested = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)
# one_of picks a branch uniformly: 10,000-level nesting in 1 value of 8.
hostile_values = st.one_of(*[nested] * 7, st.sampled_from([DEEP_ARRAY, DEEP_OBJECT]))


STRING_FIELDS = {"refund_id", "order_id", "buyer_id", "merchant_id", "sku", "title", "category", "description",
                 "image_id", "device_fingerprint", "payment_fingerprint", "address_fingerprint"}


def _near_valid(name: object) -> st.SearchStrategy[Any] | None:
    if name in FIELD_STRINGS:
        return st.sampled_from(FIELD_STRINGS[str(name)])
    return hostile_text if name in STRING_FIELDS else None


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _paths(value, (*prefix, i))
    return found


@st.composite
def mutations(draw: st.DrawFn, paths: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """1-2 edits of a valid request: set, delete, add a field, or splice bytes into the text."""
    edits: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths))
        near_valid = _near_valid(path[-1])
        action = draw(st.sampled_from(["set", "set", "set", "set", "delete", "extra", "extra", "bytes", "surrogate"]))
        if action == "set":
            # Mostly a value of the right type, so that many requests get past the contract.
            typed = near_valid is not None and draw(st.integers(0, 2)) > 0
            value = draw(near_valid if typed and near_valid is not None else hostile_values)
            edits.append(("set", path, value))
        elif action == "delete":
            edits.append(("delete", path))
        elif action == "surrogate":
            edits.append(("set", path, draw(lone_surrogate_text)))
        elif action == "extra":
            edits.append(("extra", path[:-1], draw(any_text), draw(hostile_values)))
        else:
            junk = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\x00", b"\xc3", b"}", b'"', b"\\"]))
            edits.append(("bytes", draw(st.floats(0, 1)), junk))
    # Strings as \u escapes, or now and then as raw UTF-8 (lone surrogates then become invalid bytes).
    edits.append(("escape", draw(st.sampled_from([True, True, True, False]))))
    return edits


def _to_json(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{_to_json(str(k), ascii_only)}:{_to_json(v, ascii_only)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def apply_edits(doc: dict[str, Any], edits: list[tuple[Any, ...]], tag: str) -> bytes:
    """The mutated request as bytes. A string written into refund_id is prefixed with ``tag``,
    so refund ids stay unique across the batch and each decision maps to one message."""
    doc = copy.deepcopy(doc)
    spliced: list[tuple[float, bytes]] = []
    ascii_only = True
    for edit in edits:
        if edit[0] == "escape":
            ascii_only = edit[1]
            continue
        if edit[0] == "bytes":
            spliced.append((edit[1], edit[2]))
            continue
        path = edit[1]
        parent: Any = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            if edit[0] == "set":
                value = edit[2]
                if path == ("refund_id",) and isinstance(value, str):
                    value = tag + value
                parent[path[-1]] = value
            elif edit[0] == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):  # extra
                parent[edit[2]] = edit[3]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the place: the edit just doesn't apply
    raw = _to_json(doc, ascii_only).encode("utf-8", "surrogatepass")
    for where, junk in spliced:
        at = int(where * len(raw))
        raw = raw[:at] + junk + raw[at:]
    return raw


def generate_edits(paths: list[tuple[Any, ...]], count: int, seed: int) -> list[list[tuple[Any, ...]]]:
    """Draw ``count`` examples up front (no shrinking, no database), so they can be produced in one go."""
    drawn: list[list[tuple[Any, ...]]] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=count, database=None, phases=[hypothesis.Phase.generate], deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(mutations(paths))
    def collect(edits: list[tuple[Any, ...]]) -> None:
        drawn.append(edits)

    collect()
    return drawn[:count]


def fixed_cases(doc: dict[str, Any]) -> list[bytes]:
    """Cases named in the issue, always sent whatever hypothesis draws."""
    text = json.dumps(doc)
    body = text[:-1]
    return [
        (body + ', "deep": ' + DEEP_ARRAY.text + "}").encode(),
        (body + ', "deep": ' + DEEP_OBJECT.text + "}").encode(),
        (body + ', "big": 1e400, "bigger": -1e400}').encode(),
        (body + f', "huge": {10**100}}}').encode(),
        (body + ', "digits": ' + "9" * 5000 + "}").encode(),
        (body + ', "not_a_number": NaN}').encode(),
        text.replace(f'"{doc["refund_id"]}"', f'"{doc["refund_id"]}\\ud800"', 1).encode(),
        text.replace(f'"{doc["refund_id"]}"', f'"{doc["refund_id"]}-\u202e\U0001f600"', 1).encode(),
        text.replace('"59.90"', "null").encode(),
        text.replace('"requested_at": "2026-11-23T09:41:07Z"', '"requested_at": "9999-12-31T23:59:59Z"').encode(),
        text.replace('"requested_at": "2026-11-23T09:41:07Z"', '"requested_at": "0001-01-01T00:00:00Z"').encode(),
        (body + f', "refund_id": "{doc["refund_id"]}-dup"}}').encode(),  # duplicate key
        json.dumps({k: v for k, v in doc.items() if k != "buyer"}).encode(),
        (body + ', "pad": "' + "x" * MAX_MESSAGE_BYTES + '"}').encode(),  # oversized
        b"\xef\xbb\xbf" + text.encode(),  # UTF-8 BOM
        b"",
        b"null",
    ]


def _expected(raw: bytes) -> tuple[str, str]:
    """("decision", refund_id) or ("dlq", error_kind), by the contract the worker enforces."""
    try:
        return "decision", parse_request(raw, MAX_MESSAGE_BYTES).refund_id
    except ContractError as error:
        return "dlq", error.kind


def test_hostile_events_each_end_as_one_decision_or_one_dead_letter(env: Env) -> None:
    # How I checked this fails: on a copy of the tree, intake re-raising schema errors instead of
    # dead-lettering them left dead letters missing and the final request undecided. And
    # on the tree as I found it, the fixed case requested_at=9999-12-31T23:59:59Z crashes the
    # decide agent (OverflowError in scorers/policy.py decide(), raised again in _hold_unscored):
    # the rest of its batch and every later request get no decision. Fails until that is fixed.
    seed = int(os.environ.get("HOSTILE_SEED", random.randrange(2**32)))
    print(f"\nhypothesis seed {seed} (rerun with HOSTILE_SEED={seed})")
    template = valid_request(env, "REFUND")
    edits = generate_edits(_paths(template), 80, seed)

    messages: dict[str, bytes] = {}
    for i, raw in enumerate(fixed_cases(valid_request(env, "HF-000|"))):
        messages[f"HF-{i:03d}|"] = raw.replace(b"HF-000|", f"HF-{i:03d}|".encode())
    for i, edit in enumerate(edits):
        tag = f"HX-{i:03d}|"
        messages[tag] = apply_edits(valid_request(env, tag), edit, tag)
    expected = {key: _expected(raw) for key, raw in messages.items()}
    decided_ids = [value for kind, value in expected.values() if kind == "decision"]
    assert len(set(decided_ids)) == len(decided_ids), "refund ids must be unique to match decisions"
    print(f"{len(messages)} hostile messages: {len(decided_ids)} valid, "
          f"{Counter(v for k, v in expected.values() if k == 'dlq')} expected in the DLQ")

    for key, raw in messages.items():
        env.kafka.producer.send("refund.requests", key=key.encode(), value=raw)
    env.kafka.producer.flush()
    final = valid_request(env, "HF-final")
    env.kafka.send("refund.requests", "HF-final", final)

    wanted_decisions = {rid.encode() for rid in [*decided_ids, "HF-final"]}
    wanted_letters = {key.encode() for key, (kind, _) in expected.items() if kind == "dlq"}

    def complete(_: list[Any]) -> bool:
        letters = {r.key for r in env.kafka.records["refund.requests.dlq"]}
        return wanted_decisions <= set(decisions_by_key(env.kafka)) and wanted_letters <= letters

    try:
        env.kafka.collect("refund.decisions", complete, 60)  # ~15 s when all is well
    except AssertionError:
        missing_d = wanted_decisions - set(decisions_by_key(env.kafka))
        missing_l = wanted_letters - {r.key for r in env.kafka.records["refund.requests.dlq"]}
        raise AssertionError(f"no outcome for decisions {sorted(missing_d)[:10]} / dead letters "
                             f"{sorted(missing_l)[:10]}; worker errors:\n{worker_errors(env.worker)}") from None
    time.sleep(2)  # anything duplicated arrives now
    env.kafka.collect("refund.decisions", lambda _: True, 1)

    ours = (b"HF-", b"HX-")  # every refund id and key of this test starts so; other tests share the topics
    decisions = Counter({k: n for k, n in decisions_by_key(env.kafka).items() if k.startswith(ours)})
    letters: dict[bytes, list[dict[str, Any]]] = {}
    for r in env.kafka.records["refund.requests.dlq"]:
        if r.key.startswith(ours):
            letters.setdefault(r.key, []).append(json.loads(r.value))
    for key, (kind, value) in expected.items():
        got_letters = letters.get(key.encode(), [])
        if kind == "decision":
            assert decisions[value.encode()] == 1, f"{key}: {decisions[value.encode()]} decisions"
            assert not got_letters, f"{key} was decided and dead-lettered"
        else:
            assert len(got_letters) == 1, f"{key}: {len(got_letters)} dead letters"
            assert got_letters[0]["error"].strip(), f"{key}: dead letter without a reason"
            assert got_letters[0]["error_kind"] == value, (key, got_letters[0]["error"])
    assert sum(decisions.values()) == len(wanted_decisions)  # nothing decided that was not sent
    assert sum(len(v) for v in letters.values()) == len(wanted_letters)
    final_decision = next(json.loads(r.value) for r in env.kafka.records["refund.decisions"]
                          if r.key == b"HF-final")
    assert final_decision["decision"] == "approve", final_decision["reasons"]
    alive(env.worker)
