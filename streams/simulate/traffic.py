"""Realistic sample refund traffic: events plus the images they point to, with labels.

``generate(out, refunds=60)`` writes ``out/images/*``, ``out/events.jsonl`` (``{"topic",
"key", "value"}`` lines in event-time order), ``out/labels.jsonl`` (kind and
expected decision per refund) and returns a summary. Images are served over
loopback HTTP by :func:`serve_directory`. Used by the demo, the tests and load runs.
"""

from __future__ import annotations

import functools
import http.server
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from streams.simulate import images as sim

START = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 45
HIGH_VALUE = 3000
AIGC_NS = "http://www.tc260.org.cn/ns/AIGC/1.0/"

MIX = {
    "genuine_damage": 0.28, "genuine_photo": 0.08, "not_received": 0.05, "high_value": 0.05,
    "edited_listing": 0.2, "ai_generated": 0.05, "reused_evidence": 0.08, "serial_abuser": 0.12,
    "linked_to_fraudster": 0.06, "broken_evidence": 0.03,
}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Buyer:
    buyer_id: str
    created: datetime
    device: str
    payment: str
    address: str


@dataclass
class _World:
    out: Path
    base: str
    rng: np.random.Generator
    r: random.Random
    products: list[sim.Product] = field(default_factory=list)
    listings: dict[str, list[tuple[str, str, Image.Image]]] = field(default_factory=dict)
    events: list[tuple[datetime, int, str, str, dict[str, Any]]] = field(default_factory=list)
    labels: list[dict[str, Any]] = field(default_factory=list)
    n_images: int = 0
    n_refunds: int = 0

    def save(self, data: bytes, ext: str) -> tuple[str, str]:
        self.n_images += 1
        image_id = f"IM-{self.n_images:05d}"
        (self.out / "images" / f"{image_id}.{ext}").write_bytes(data)
        return image_id, f"{self.base}/images/{image_id}.{ext}"

    def write(self, img: Image.Image, fmt: str = "JPEG", **meta: Any) -> tuple[str, str]:
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        return self.save(sim.encode(img, fmt, self.r.randint(78, 94), **meta), ext)

    def buyer(self, prefix: str, created: datetime | None = None) -> _Buyer:
        h = lambda: f"{self.r.randrange(16**12):012x}"  # noqa: E731
        return _Buyer(f"BY-{prefix}{self.r.randrange(16**8):08x}",
                      created or START - timedelta(days=self.r.uniform(120, 1500)),
                      f"dev-{h()}", f"pay-{h()}", f"adr-{h()}")

    def refund(self, buyer: _Buyer, product: sim.Product, t: datetime, kind: str, expected: str,
               evidence: list[tuple[str, str]], *, reason: str = "damaged", amount: str | None = None,
               expect_reason: str | None = None) -> str:
        self.n_refunds += 1
        refund_id = f"RF-SIM-{self.n_refunds:05d}"
        delivered = t - timedelta(days=self.r.uniform(0.3, 4))
        placed = delivered - timedelta(days=self.r.uniform(1, 5))
        refs = [{"image_id": i, "url": u, "source": "listing"} for i, u, _ in self.listings[product.sku]]
        value = {
            "schema": "refund-request/v1", "refund_id": refund_id, "order_id": f"OD-SIM-{self.n_refunds:05d}",
            "buyer_id": buyer.buyer_id, "merchant_id": f"MC-{product.sku[-3:]}", "requested_at": iso(t),
            "kind": "refund_only", "reason": reason,
            "description": "Arrived damaged." if reason == "damaged" else "See photos.",
            "amount": {"value": amount or product.price, "currency": "CNY"},
            "item": {"sku": product.sku, "title": product.title, "category": product.category},
            "order": {"placed_at": iso(placed), "delivered_at": iso(delivered)},
            "evidence": [{"image_id": i, "url": u} for i, u in evidence],
            "reference_images": refs,
            "buyer": {"account_created_at": iso(buyer.created), "device_fingerprint": buyer.device,
                      "payment_fingerprint": buyer.payment, "address_fingerprint": buyer.address},
        }
        self.events.append((t, 1, "refund.requests", refund_id, value))
        fraud = kind not in {"genuine_damage", "genuine_photo", "not_received", "high_value", "broken_evidence"}
        self.labels.append({"refund_id": refund_id, "kind": kind, "expected": expected, "fraud": fraud,
                            "detectable": fraud and expected == "hold", "expected_reason": expect_reason})
        return refund_id

    def outcome(self, refund_id: str, buyer: _Buyer, product: sim.Product, t: datetime, verdict: str) -> None:
        value = {"schema": "refund-outcome/v1", "refund_id": refund_id, "buyer_id": buyer.buyer_id,
                 "merchant_id": f"MC-{product.sku[-3:]}", "verdict": verdict, "decided_at": iso(t),
                 "source": "review"}
        self.events.append((t, 0, "refund.outcomes", refund_id, value))


def aigc_xmp(r: random.Random) -> bytes:
    """An XMP packet with the GB 45438-2025 implicit label (element form, escaped JSON)."""
    label = {"Label": "1", "ContentProducer": f"0011913101{r.randrange(10**8):08d}",
             "ProduceID": f"{r.randrange(16**12):012x}", "ReservedCode1": "", "ContentPropagator": "",
             "PropagateID": "", "ReservedCode2": ""}
    body = escape(json.dumps(label, separators=(",", ":")))
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:TC260="{AIGC_NS}"><TC260:AIGC>{body}</TC260:AIGC>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def generate(
    out: Path, *, refunds: int = 60, seed: int = 1, image_base: str = "http://127.0.0.1:8765"
) -> dict[str, Any]:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    w = _World(out, image_base.rstrip("/"), np.random.default_rng(seed), random.Random(seed))
    r = w.r
    for i in range(max(4, refunds // 8)):
        product = sim.make_product(w.rng, i)
        shots = []
        for variant in (0, 1):
            img = sim.listing_photo(product, w.rng, variant)
            image_id, url = w.write(img, "JPEG")
            shots.append((image_id, url, img))
        w.products.append(product)
        w.listings[product.sku] = shots

    def when(lo: float = 0, hi: float = DAYS) -> datetime:
        return START + timedelta(days=r.uniform(lo, hi), seconds=r.randrange(60))

    quota = {k: max(1, round(v * refunds)) for k, v in MIX.items()}
    damages = list(sim.DAMAGE_KINDS)

    for kind in ("genuine_damage", "genuine_photo", "not_received", "high_value"):
        for _ in range(quota[kind]):
            b, p, t = w.buyer("G"), r.choice(w.products), when()
            if kind == "not_received":
                w.refund(b, p, t, kind, "approve", [], reason="not_received")
                continue
            damage = None if kind == "genuine_photo" else r.choice(damages)
            ev = [w.write(sim.buyer_photo(p, w.rng, damage), r.choice(["JPEG", "JPEG", "WEBP"]))]
            amount = f"{r.randint(HIGH_VALUE, 8000)}.00" if kind == "high_value" else None
            rid = w.refund(b, p, t, kind, "hold" if kind == "high_value" else "approve", ev,
                           reason="not_as_described" if damage is None else "damaged", amount=amount,
                           expect_reason="HIGH_VALUE" if kind == "high_value" else None)
            if r.random() < 0.3:
                w.outcome(rid, b, p, t + timedelta(days=r.uniform(0.5, 3)), "legitimate")

    for n in range(quota["edited_listing"]):
        b, p, t = w.buyer("E"), r.choice(w.products), when()
        _, _, listing = r.choice(w.listings[p.sku])
        edited, box = sim.edit_listing(listing, p, w.rng, r.choice(damages))
        edited, box = sim.postprocess(edited, box, w.rng, resize=r.uniform(0.7, 1.3))
        meta = {"xmp": aigc_xmp(r)} if n % 3 == 0 else {}
        ev = [w.write(edited, r.choice(["JPEG", "PNG", "WEBP"]), **meta)]
        rid = w.refund(b, p, t, "edited_listing", "hold", ev, expect_reason="EVIDENCE_EDITED_FROM_LISTING")
        if r.random() < 0.5:
            w.outcome(rid, b, p, t + timedelta(days=r.uniform(0.5, 2)), "fraud")

    for _ in range(quota["ai_generated"]):
        b, p, t = w.buyer("A"), r.choice(w.products), when()
        fake = sim.make_product(w.rng, 1000 + r.randrange(1000))
        img = sim.buyer_photo(fake, w.rng, r.choice(damages))
        w.refund(b, p, t, "ai_generated", "hold", [w.write(img, "JPEG", xmp=aigc_xmp(r))],
                 expect_reason="AI_LABEL_IMPLICIT")

    left = quota["reused_evidence"]
    while left > 0:
        p, t = r.choice(w.products), when(0, DAYS - 10)
        original = sim.buyer_photo(p, w.rng, r.choice(damages))
        first = w.write(original, "JPEG")
        w.refund(w.buyer("R"), p, t, "reused_evidence_first", "approve", [first])
        left -= 1
        for _ in range(min(left, r.randint(1, 2))):
            t += timedelta(days=r.uniform(0.5, 3))
            copy = original.resize((int(original.width * r.uniform(0.75, 0.95)),
                                    int(original.height * r.uniform(0.75, 0.95))))
            w.refund(w.buyer("R"), p, t, "reused_evidence", "hold", [w.write(copy, r.choice(["JPEG", "WEBP"]))],
                     expect_reason="EVIDENCE_REUSED")
            left -= 1

    left = quota["serial_abuser"]
    while left > 0:
        b, t = w.buyer("S"), when(0, DAYS - 8)
        for n in range(min(left, r.randint(5, 7))):
            t += timedelta(hours=r.uniform(5, 28))
            p = r.choice(w.products)
            ev = [w.write(sim.buyer_photo(p, w.rng, r.choice(damages)), "JPEG")]
            w.refund(b, p, t, "serial_abuser" if n >= 3 else "serial_abuser_early", "hold" if n >= 3 else "approve",
                     ev, amount=f"{r.randint(40, 500)}.00", expect_reason="CLAIM_VELOCITY_HIGH" if n >= 3 else None)
            left -= 1

    left = quota["linked_to_fraudster"]
    while left > 0:
        bad, p, t = w.buyer("F"), r.choice(w.products), when(0, DAYS - 8)
        _, _, listing = r.choice(w.listings[p.sku])
        edited, _ = sim.edit_listing(listing, p, w.rng, r.choice(damages))
        rid = w.refund(bad, p, t, "edited_listing", "hold", [w.write(edited, "JPEG")],
                       expect_reason="EVIDENCE_EDITED_FROM_LISTING")
        w.outcome(rid, bad, p, t + timedelta(days=r.uniform(0.3, 1)), "fraud")
        t += timedelta(days=r.uniform(1.5, 4))
        twin = w.buyer("N", created=t - timedelta(days=r.uniform(0.2, 2)))
        if r.random() < 0.5:
            twin.device = bad.device
        else:
            twin.payment = bad.payment
        q = r.choice(w.products)
        w.refund(twin, q, t, "linked_to_fraudster", "hold",
                 [w.write(sim.buyer_photo(q, w.rng, r.choice(damages)), "JPEG")],
                 expect_reason="LINKED_TO_CONFIRMED_FRAUD")
        left -= 1

    for n in range(quota["broken_evidence"]):
        b, p, t = w.buyer("B"), r.choice(w.products), when()
        if n % 2 == 0:
            ev = [(f"IM-MISSING-{n}", f"{w.base}/images/does-not-exist-{n}.jpg")]
            expect = "IMAGE_NOT_FOUND"
        else:
            data = sim.encode(sim.buyer_photo(p, w.rng, "crack"), "JPEG")
            ev = [w.save(data[: len(data) // 3], "jpg")]
            expect = "IMAGE_CORRUPT"
        w.refund(b, p, t, "broken_evidence", "hold", ev, expect_reason=expect)

    w.events.sort(key=lambda e: (e[0], e[1], e[3]))
    with (out / "events.jsonl").open("w", encoding="utf-8") as f:
        for _, _, topic, key, value in w.events:
            f.write(json.dumps({"topic": topic, "key": key, "value": value}, ensure_ascii=False) + "\n")
    with (out / "labels.jsonl").open("w", encoding="utf-8") as f:
        for label in sorted(w.labels, key=lambda x: x["refund_id"]):
            f.write(json.dumps(label) + "\n")
    summary = {"seed": seed, "refunds": len(w.labels), "images": w.n_images,
               "kinds": dict(sorted(Counter(x["kind"] for x in w.labels).items()))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ImageServer(http.server.ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a worker fetching a batch's images at once (dozens of
    # connections) overflowed it, and each dropped SYN cost a 1 s TCP retransmission.
    request_queue_size = 256


def serve_directory(directory: Path, host: str, port: int) -> ImageServer:
    """Serve ``directory`` over HTTP from a daemon thread (sample images for demos, tests, bench)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ImageServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="image-server", daemon=True).start()
    return server
