"""CPU time of image.reference per evidence image, by kind of evidence.

    python bench/bench_image_reference.py [--products 12]

Images come from streams.simulate.images, prepared as the service prepares them; only the
scorer's own work is timed (time.process_time, one thread, reference features cached as they
are in a long-running worker — the first sight of each reference is timed separately).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from scorers.base import PreparedImage, ScoringInput
from scorers.image_reference import ReferenceMatchScorer
from scorers.prepare import prepare_image
from streams.simulate import images as sim


def prepared(img, image_id: str, role: str = "evidence", fmt: str = "JPEG", quality: int = 88) -> PreparedImage:
    # At the size the pool decodes to for this scorer (its pixels_side), as in the service.
    return prepare_image(sim.encode(img, fmt, quality), image_id=image_id, role=role, cache_key=image_id,
                         working_side=ReferenceMatchScorer.pixels_side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=12)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cases: dict[str, list[tuple[PreparedImage, tuple[PreparedImage, ...]]]] = {
        "genuine photo": [], "edited listing": [], "listing copy": [], "unrelated": []}
    shops = []
    for seed in range(args.products):
        rng = np.random.default_rng(seed)
        product = sim.make_product(rng, seed)
        listings = (sim.listing_photo(product, rng, 0), sim.listing_photo(product, rng, 1))
        refs = tuple(prepared(img, f"L{seed}-{i}", "listing") for i, img in enumerate(listings))
        shops.append((product, listings, refs))
    for seed, (product, listings, refs) in enumerate(shops):
        rng = np.random.default_rng(100 + seed)
        for k, damage in enumerate(sim.DAMAGE_KINDS):
            cases["genuine photo"].append((prepared(sim.buyer_photo(product, rng, damage), f"B{seed}{k}"), refs))
            edited, box = sim.edit_listing(listings[k % 2], product, rng, damage)
            edited, _ = sim.postprocess(edited, box, rng, resize=float(rng.uniform(0.6, 1.6)), crop=0.08,
                                        mirror=bool(k % 2), rotate_deg=float(rng.uniform(-8, 8)), gamma=1.15)
            cases["edited listing"].append((prepared(edited, f"E{seed}{k}"), refs))
        copy, _ = sim.postprocess(listings[0], (0, 0, 1, 1), rng, resize=0.9, crop=0.04)
        cases["listing copy"].append((prepared(copy, f"C{seed}"), refs))
        other = shops[(seed + 1) % len(shops)]
        cases["unrelated"].append((prepared(sim.buyer_photo(other[0], rng), f"U{seed}"), refs))

    scorer = ReferenceMatchScorer()
    cold = []
    for _, refs in (cases["genuine photo"][k * 4] for k in range(len(shops))):
        started = time.process_time()
        for ref in refs:
            scorer._reference_features(ref)
        cold.append((time.process_time() - started) * 1000 / len(refs))
    everything = []
    for kind, items in cases.items():
        timings = []
        for evidence, refs in items:
            started = time.process_time()
            scorer.score(ScoringInput(None, (evidence,), refs))  # type: ignore[arg-type]
            timings.append((time.process_time() - started) * 1000)
        everything += timings
        print(f"{kind:15s} n={len(timings):3d}  median {np.median(timings):5.1f} ms  "
              f"p95 {np.percentile(timings, 95):5.1f} ms")
    print(f"{'all':15s} n={len(everything):3d}  median {np.median(everything):5.1f} ms  "
          f"p95 {np.percentile(everything, 95):5.1f} ms")
    print(f"{'new reference':15s} n={len(cold):3d}  median {np.median(cold):5.1f} ms  (features, once per process)")


if __name__ == "__main__":
    main()
