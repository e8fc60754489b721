"""One poll's photos on their way to the model, claim checks fetched off the poll loop.

A claim check (:mod:`pipeline.kafka.claim_check`) is a network request a stranger's message
asks for; fetched inline, ten of them to a server that never answers held the poll loop, and
every photo behind them, for ten deadlines. Here each poll becomes a :class:`PollWork`:

- inline photos are parsed at once and go to the model straight away;
- claim checks are fetched in a bounded thread pool (:class:`ClaimFetcher`), all of one poll's
  together, each within the **same deadline counted from the poll** (queueing in the pool
  included), and go to the model as one more submission once all of that poll's are back;
- the poll loop never waits on a fetch while other work can go on: it only asks ``done()``.

So N claim checks that hang cost the photos polled with or after them at most one deadline
(plus :data:`FETCH_GRACE_S` should a fetcher overrun its own deadline), whatever N is.

Outcomes come back in the poll's message order (:meth:`PollWork.outcomes`), and a poll is only
handed back (its offsets marked done) when every message in it has one, as the worker's
checkpoints need. :meth:`PollWork.cancel` (a rewind or an abandon) drops a poll: fetches not
started never run, fetches running finish within their deadline and their results go nowhere,
so nothing of a dropped poll is counted twice, and nothing outlives the deadline.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pipeline.errors import SchemaError
from pipeline.kafka import claim_check, fetch_policy
from pipeline.kafka.claim_check import FetchFailed, FetchLimits
from pipeline.model.inference import Failed, Featurized, ImageRecord, Inference, Submission

#: How long past a poll's deadline a fetch may still be waited for (its own deadline should end
#: it first; this bounds a fetcher that overruns, e.g. a stalled S3 client).
FETCH_GRACE_S = 1.0

#: message, its bytes (fetched or inline) -> the record for the model; raises for a bad message
MakeRecord = Callable[[Any, "bytes | None"], ImageRecord]


@dataclass
class Refusal:
    """A message that never reaches the model: its dead letter's reason and detail.
    ``cause`` is for the featurizer's log only (what a server answered, say)."""

    reason: str
    detail: str
    cause: str = ""


Outcome = Featurized | Failed | Refusal


def refusal(exc: BaseException) -> Refusal:
    """The dead letter of a message whose record could not be made."""
    if isinstance(exc, FetchFailed):
        return Refusal(exc.reason, exc.detail, exc.cause)
    if isinstance(exc, SchemaError):
        return Refusal("invalid_message", str(exc))
    return Refusal("internal_error", f"{type(exc).__name__}: {exc}")


class PollWork:
    """One poll's messages: inline records submitted now, claim checks when fetched."""

    def __init__(self, messages: Sequence[Any], inference: Inference, limits: FetchLimits):
        self.messages = messages
        self.inference = inference
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s  # one for the whole poll, queueing included
        self.started = time.perf_counter()
        self.refused: dict[int, Refusal] = {}  # id(message) -> why it never reaches the model
        self.fetches: list[tuple[Any, concurrent.futures.Future]] = []
        self.submissions: list[Submission] = []
        self._fetched_submitted = False

    def take(self, message: Any, make: Callable[[], ImageRecord], ready: list[ImageRecord]) -> None:
        try:
            ready.append(make())
        except Exception as exc:  # noqa: BLE001 - a bad message is its own dead letter
            self.refused[id(message)] = refusal(exc)

    # -- the poll loop's questions ------------------------------------------------------------
    def done(self) -> bool:
        """Every message has its outcome (submits the fetched records once all are back)."""
        self.advance()
        return self._fetched_submitted and all(s.done() for s in self.submissions)

    def wait(self) -> None:
        """Block until :meth:`done` (at most the deadline plus the grace for fetches)."""
        pending = [f for _, f in self.fetches]
        if pending and not self._fetched_submitted:
            concurrent.futures.wait(pending, timeout=max(0.0, self.deadline + FETCH_GRACE_S - time.monotonic()))
            self.advance(force=True)
        for submission in self.submissions:
            submission.wait()

    def outcomes(self) -> list[tuple[Any, Outcome]]:
        """(message, outcome) for every message, in the poll's order (after :meth:`wait`)."""
        results: dict[int, Outcome] = {}
        for submission in self.submissions:
            for result in submission.wait():
                results[id(result.record.context)] = result
        return [(m, self.refused.get(id(m)) or results[id(m)]) for m in self.messages]

    def cancel(self) -> None:
        for _, future in self.fetches:
            future.cancel()  # one not started never runs; one running ends by its deadline
        for submission in self.submissions:
            submission.cancel()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, force: bool = False) -> None:
        """Once all of this poll's fetches are back (or overdue), their records go to the model
        as one submission; called for every poll in flight on each turn of the loop, so a later
        poll's claim checks need not wait for an earlier poll to be collected."""
        if self._fetched_submitted:
            return
        overdue = time.monotonic() > self.deadline + FETCH_GRACE_S
        if not (force or overdue or all(f.done() for _, f in self.fetches)):
            return
        fetched: list[ImageRecord] = []
        for message, future in self.fetches:
            if not future.done():
                future.cancel()
                scheme = (claim_check.reference_uri(message.headers) or "").partition(":")[0][:10]
                self.refused[id(message)] = refusal(fetch_policy.failed(
                    scheme, self.limits, "the fetch was still running past its deadline"))
                continue
            try:
                fetched.append(future.result())
            except Exception as exc:  # noqa: BLE001 - its own dead letter
                self.refused[id(message)] = refusal(exc)
        if fetched:
            self.submissions.append(self.inference.submit(fetched))
        self._fetched_submitted = True


class ClaimFetcher:
    """The featurizer's fetch pool: as many threads as messages may be in flight, started
    lazily (a stream without claim checks starts none), so no claim check ever queues behind
    another's deadline in the usual case, and the deadline counts from the poll if it does."""

    def __init__(self, limits: FetchLimits, workers: int):
        self.limits = limits
        self.workers = max(1, workers)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self, messages: Sequence[Any], inference: Inference, make: MakeRecord) -> PollWork:
        """Parse inline messages and submit them; start the claim checks' fetches."""
        work = PollWork(messages, inference, self.limits)
        ready: list[ImageRecord] = []
        for m in messages:
            if claim_check.reference_uri(m.headers) is None:
                work.take(m, lambda m=m: make(m, m.value), ready)
            else:
                work.fetches.append((m, self._submit(self._fetch, m, make, work.deadline)))
        work.submissions.append(inference.submit(ready))
        if not work.fetches:
            work._fetched_submitted = True
        return work

    def _fetch(self, m: Any, make: MakeRecord, deadline: float) -> ImageRecord:
        return make(m, claim_check.resolve_value(m.key, m.value, m.headers, self.limits, deadline))

    def _submit(self, fn: Callable[..., ImageRecord], *args: Any) -> concurrent.futures.Future:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="deeper-fetch")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
