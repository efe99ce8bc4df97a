"""Scoring one request: fetch its images, run the image scorers in the pool, then the
behaviour scorers on the looked-up features. Every failure becomes data (a
problem or a :class:`ScorerFailure`), so the policy can hold with a reason.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from scorers.base import BuyerFeatures, Reason, Scorer, ScoreResult, ScoringInput
from scorers.policy import ScorerFailure
from scorers.registry import Unavailable, load_scorers
from streams.contract import RefundRequest
from streams.fetch import FetchProblem, ImageFetcher
from streams.image_pool import ImageJob, ImagePool, ImagePoolTimeout, RawImage
from streams.metrics import Metrics
from streams.settings import ScoringSettings

log = logging.getLogger(__name__)


@dataclass
class ImagePhase:
    results: dict[str, ScoreResult | ScorerFailure] = field(default_factory=dict)
    problems: list[Reason] = field(default_factory=list)
    evidence_hashes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class RequestScorer:
    def __init__(
        self,
        settings: ScoringSettings,
        fetcher: ImageFetcher,
        pool: ImagePool | None,
        metrics: Metrics,
        max_pixels: int,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.pool = pool
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.behaviour: list[Scorer | Unavailable] = load_scorers(None, settings.disabled, kind="behaviour")
        self.image_scorer_names = [s.name for s in load_scorers(None, settings.disabled, kind="image")]

    async def image_phase(self, request: RefundRequest) -> ImagePhase:
        started = time.perf_counter()
        phase = ImagePhase()
        if not self.image_scorer_names or self.pool is None:
            phase.seconds = time.perf_counter() - started
            return phase
        wanted = [(e.image_id, e.url, e.data, False, "evidence") for e in request.evidence]
        wanted += [(r.image_id, r.url, r.data, True, r.source) for r in request.reference_images]
        fetched = await self.fetcher.fetch_all((i, u, d, c) for i, u, d, c, _ in wanted)
        raws: list[RawImage] = []
        for (image_id, url, _data, _cacheable, role), got in zip(wanted, fetched, strict=True):
            if isinstance(got, FetchProblem):
                self.metrics.image_fetches.labels(got.code).inc()
                self.metrics.image_fetch_failures.labels(got.code).inc()
                code = got.code if role == "evidence" else "REFERENCE_" + got.code
                phase.problems.append(Reason(code, got.message, 1.0, {"image_id": image_id, "role": role}))
                continue
            self.metrics.image_fetches.labels("cached" if got.cached else "ok").inc()
            self.metrics.image_bytes.observe(len(got.data))
            digest = hashlib.sha256(got.data).hexdigest()[:24]
            raws.append(RawImage(image_id, role, got.data, f"{url or 'inline'}#{digest}"))
        job = ImageJob(
            request=request.facts(),
            images=tuple(raws),
            working_side=self.settings.working_side,
            max_pixels=self.max_pixels,
            budget_s=self.settings.image_timeout_s,
        )
        try:
            result = await self.pool.run(job)
        except ImagePoolTimeout as exc:
            for name in self.image_scorer_names:
                phase.results[name] = ScorerFailure("SCORER_TIMEOUT", f"{name}: {exc}")
                self.metrics.scorer_errors.labels(name, "timeout").inc()
        except Exception as exc:
            log.exception("image pool failed for refund %s", request.refund_id)
            for name in self.image_scorer_names:
                phase.results[name] = ScorerFailure("SCORER_FAILED", f"{name}: image pool failed: {type(exc).__name__}")
                self.metrics.scorer_errors.labels(name, "error").inc()
        else:
            phase.results.update(result.results)
            phase.problems.extend(result.problems)
            phase.evidence_hashes = result.evidence_hashes
            for name, seconds in result.cpu_seconds.items():
                self.metrics.scorer_latency.labels(name).observe(seconds)
            for name, outcome in result.results.items():
                if isinstance(outcome, ScorerFailure):
                    kind = "timeout" if outcome.code == "SCORER_TIMEOUT" else "error"
                    self.metrics.scorer_errors.labels(name, kind).inc()
        phase.seconds = time.perf_counter() - started
        return phase

    def behaviour_phase(
        self, request: RefundRequest, features: BuyerFeatures
    ) -> dict[str, ScoreResult | ScorerFailure]:
        """Cheap arithmetic, inline on the loop; a scorer that overran its budget counts as timed out."""
        data = ScoringInput(request=request.facts(), features=features)
        results: dict[str, ScoreResult | ScorerFailure] = {}
        budget = self.settings.behaviour_timeout_s
        for scorer in self.behaviour:
            if isinstance(scorer, Unavailable):
                results[scorer.name] = ScorerFailure("SCORER_FAILED", f"{scorer.name} unavailable: {scorer.error}")
                self.metrics.scorer_errors.labels(scorer.name, "error").inc()
                continue
            started = time.perf_counter()
            try:
                outcome: ScoreResult | ScorerFailure = scorer.score(data)
            except Exception as exc:
                outcome = ScorerFailure("SCORER_FAILED", f"{scorer.name} failed: {type(exc).__name__}: {exc}"[:300])
                self.metrics.scorer_errors.labels(scorer.name, "error").inc()
            elapsed = time.perf_counter() - started
            if elapsed > budget:
                outcome = ScorerFailure("SCORER_TIMEOUT", f"{scorer.name} took {elapsed:.2f} s, over {budget:g} s")
                self.metrics.scorer_errors.labels(scorer.name, "timeout").inc()
            self.metrics.scorer_latency.labels(scorer.name).observe(elapsed)
            results[scorer.name] = outcome
        return results
