"""Image work in a process pool: decode, run the image scorers, fingerprint evidence.

The event loop only awaits. Each job carries one request's fetched bytes; the
child decodes them once and gives the same prepared images to every image
scorer. A scorer that overruns its budget is interrupted inside the child
(SIGALRM); a child stuck in native code is killed and the pool rebuilt, and
jobs caught in that are retried once on the fresh pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from types import FrameType

from scorers.base import PreparedImage, Reason, RequestFacts, Scorer, ScoreResult, ScoringInput
from scorers.policy import ScorerFailure
from scorers.prepare import ImageProblem, prepare_image
from scorers.registry import Unavailable, load_scorers
from scorers.reuse import FINGERPRINT_SIDE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawImage:
    image_id: str
    role: str  # evidence | listing | shipment
    data: bytes
    cache_key: str


@dataclass(frozen=True)
class ImageJob:
    request: RequestFacts
    images: tuple[RawImage, ...]
    working_side: int
    max_pixels: int
    budget_s: float  # for the whole job, counted from when a child starts it


@dataclass
class ImageJobResult:
    results: dict[str, ScoreResult | ScorerFailure] = field(default_factory=dict)
    problems: list[Reason] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    evidence_hashes: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------ child side

_child_scorers: list[Scorer | Unavailable] | None = None
_child_config: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())


def _init_child(enabled: tuple[str, ...], disabled: tuple[str, ...]) -> None:
    global _child_scorers, _child_config
    _child_config = (enabled, disabled)
    _child_scorers = None
    # Ctrl-C goes to the parent, which shuts the pool down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker killed with SIGKILL cannot shut its pool down: make the children follow it.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)


def _image_scorers() -> list[Scorer | Unavailable]:
    global _child_scorers
    if _child_scorers is None:
        enabled, disabled = _child_config
        _child_scorers = load_scorers(enabled or None, disabled, kind="image")
    return _child_scorers


# Listing photos repeat across requests: keep the decoded ones per child. At 512 px (about 0.8 MB
# each, shared with image.reference's own cache of working pixels, which holds as many) this is
# less memory than 16 at 768 px was.
_REFERENCE_CACHE_ENTRIES = 32
_prepared_references: OrderedDict[tuple[str, int], PreparedImage] = OrderedDict()


def _decode_side(working_side: int) -> int:
    """The longest side to decode to: ``working_side``, or less when no image scorer (nor the reuse
    fingerprint) looks at pixels that large. image.reference compares at 512 px; decoding at 768 or
    1024 only to scale down again was about half of the pool's CPU. A scorer that does not say what
    it needs (``pixels_side``) gets the full working side."""
    needs = [FINGERPRINT_SIDE]
    for scorer in _image_scorers():
        if isinstance(scorer, Unavailable):
            continue
        side = getattr(scorer, "pixels_side", None)
        if not isinstance(side, int):
            return working_side
        needs.append(side)
    return min(working_side, max(needs))


def _prepare(raw: RawImage, job: ImageJob, side: int) -> PreparedImage:
    key = (raw.cache_key, side)
    cacheable = raw.role != "evidence" and bool(raw.cache_key)
    if cacheable and key in _prepared_references:
        _prepared_references.move_to_end(key)
        cached = _prepared_references[key]
        return replace(cached, image_id=raw.image_id, role=raw.role)  # type: ignore[arg-type]
    prepared = prepare_image(
        raw.data, image_id=raw.image_id, role=raw.role,  # type: ignore[arg-type]
        working_side=side, max_pixels=job.max_pixels, cache_key=raw.cache_key,
    )
    if cacheable:
        _prepared_references[key] = prepared
        while len(_prepared_references) > _REFERENCE_CACHE_ENTRIES:
            _prepared_references.popitem(last=False)
    return prepared


class _Overrun(Exception):
    pass


@contextlib.contextmanager
def _budget(seconds: float) -> Iterator[None]:
    def _raise(_signum: int, _frame: FrameType | None) -> None:
        raise _Overrun

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_image_job(job: ImageJob) -> ImageJobResult:
    """Runs in a pool child. Never raises for bad input: problems are data."""
    out = ImageJobResult()
    deadline = time.monotonic() + job.budget_s
    evidence: list[PreparedImage] = []
    references: list[PreparedImage] = []
    side = _decode_side(job.working_side)  # loads the scorers on a child's first job: not prepare's CPU
    started = time.process_time()
    for raw in job.images:
        try:
            prepared = _prepare(raw, job, side)
        except ImageProblem as problem:
            code = problem.code if raw.role == "evidence" else "REFERENCE_" + problem.code
            out.problems.append(Reason(code, str(problem), 1.0, {"image_id": raw.image_id, "role": raw.role}))
            continue
        (evidence if raw.role == "evidence" else references).append(prepared)
    out.cpu_seconds["prepare"] = time.process_time() - started

    started = time.process_time()
    try:
        from scorers.reuse import evidence_hash

        for image in evidence:
            out.evidence_hashes[image.image_id] = evidence_hash(image.pixels)
    except Exception as exc:  # reuse is then unverifiable: say so
        out.problems.append(Reason("EVIDENCE_FINGERPRINT_FAILED", f"cannot fingerprint evidence: {exc}"[:200], 1.0))
    out.cpu_seconds["fingerprint"] = time.process_time() - started

    data = ScoringInput(request=job.request, evidence=tuple(evidence), references=tuple(references))
    for scorer in _image_scorers():
        if isinstance(scorer, Unavailable):
            message = f"{scorer.name} unavailable: {scorer.error}"[:300]
            out.results[scorer.name] = ScorerFailure("SCORER_FAILED", message)
            continue
        started = time.process_time()
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise _Overrun
            with _budget(left):
                out.results[scorer.name] = scorer.score(data)
        except _Overrun:
            out.results[scorer.name] = ScorerFailure(
                "SCORER_TIMEOUT", f"{scorer.name} did not finish within the image budget of {job.budget_s:g} s")
        except Exception as exc:
            out.results[scorer.name] = ScorerFailure("SCORER_FAILED", f"{scorer.name} failed: {type(exc).__name__}: "
                                                     f"{str(exc)[:200]}")
        out.cpu_seconds[scorer.name] = time.process_time() - started
    return out


# ----------------------------------------------------------------- parent side


class ImagePoolTimeout(Exception):
    pass


# The child stops an overrunning scorer itself at the job's budget; the parent waits this
# much longer before it concludes the child is stuck in native code and kills the pool.
KILL_GRACE_S = 2.0


class ImagePool:
    def __init__(self, workers: int, enabled: tuple[str, ...] = (), disabled: tuple[str, ...] = ()) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._initargs = (enabled, disabled)
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0
        # At most one job per child in flight, so a job's clock starts when a child is free
        # for it: jobs queued behind a hung one do not time out with it.
        self._slots = asyncio.Semaphore(self.workers)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # no forked event loop or Kafka sockets
                initializer=_init_child,
                initargs=self._initargs,
            )
            self._generation += 1
        return self._pool

    def start(self) -> None:
        """Start the children now, so the first requests don't pay for it."""
        pool = self._executor()
        for future in [pool.submit(_warm) for _ in range(self.workers)]:
            future.result()

    async def run(self, job: ImageJob) -> ImageJobResult:
        timeout_s = job.budget_s + KILL_GRACE_S
        for attempt in (1, 2):
            async with self._slots:
                generation = self._generation
                try:
                    future = self._executor().submit(run_image_job, job)
                    return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
                except TimeoutError as exc:
                    self._recycle(generation, "an image job overran its budget")
                    raise ImagePoolTimeout(f"image scoring did not finish within {job.budget_s:g} s") from exc
                except BrokenProcessPool:
                    self._recycle(generation, "a pool child died")
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _recycle(self, generation: int, why: str) -> None:
        if self._pool is None or generation != self._generation:
            return  # someone already rebuilt it
        log.warning("rebuilding the image pool: %s", why)
        pool, self._pool = self._pool, None
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _warm() -> int:
    _image_scorers()
    return os.getpid()
