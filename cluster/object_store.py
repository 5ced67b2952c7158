"""Students hand each other their teachers' predictions through the Ray object store.

One `ExchangeBoard` actor per run, created by the driver, holds *references* only: each
worker `ray.put`s its teacher's `CompactPrediction` (2 bytes per pixel) and publishes the
reference, wrapped in a list so that the actor stores the reference instead of fetching
the object. A peer asks the board for the references it needs and `ray.get`s the objects
straight from the object store.

    worker of student 0 ── ray.put(pred) ──► object store ◄── ray.get ── worker of student 1
            └── board.publish(attempt, step, rank, [ref]) ──► board ◄── board.collect(...) ──┘

Keys are (attempt, step, rank). `rank` is the publisher's world rank, so replica i of
every student only reads from replica i of its peers (the same data shard). An entry is
dropped once all its readers have fetched it. `attempt` changes whenever Ray Train
restarts the worker group; entries of an earlier attempt are never served, so a resumed
run cannot read a prediction made by a worker that died.

The training loop runs the exchange one step ahead (it publishes batch t+1 before batch
t trains), so `publish` is fire-and-forget, and a worker starts fetching its peers'
predictions for step t+1 as soon as it has those of step t: `collect` usually finds them
already in hand. Measured with `bench/exchange.py`: the wait is ~0.1% of a step.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import ray

from seminar.exchange import CompactPrediction, Exchange

# How long `collect` waits for a peer before declaring it missing. A peer can legitimately
# lag by one evaluation or one checkpoint upload, so this is generous.
DEFAULT_TIMEOUT_S = float(os.environ.get("SEMINAR_EXCHANGE_TIMEOUT_S", "600"))


class ExchangeTimeout(RuntimeError):
    """A peer did not publish its prediction for a step in time."""


@dataclass
class _Entry:
    wrapped_ref: list  # [ObjectRef]: a list, so Ray hands the reference on without resolving it
    readers_left: int


@dataclass
class BoardStats:
    """What the board has seen; for tests, benchmarks and debugging."""

    attempt: int
    published: int
    served: int
    held: int  # entries still waiting for readers
    max_held: int
    stale_dropped: int  # publishes from an earlier attempt, ignored
    node_of_rank: dict[int, str] = field(default_factory=dict)  # where each publisher ran


@ray.remote(num_cpus=0, max_concurrency=1000)
class ExchangeBoard:
    """The run's notice board of published prediction references (an async actor)."""

    def __init__(self, num_students: int, replicas_per_student: int):
        self.num_students = num_students
        self.replicas = replicas_per_student
        self.attempt = -1
        self.entries: dict[tuple[int, int, int], _Entry] = {}
        self.changed = asyncio.Condition()
        self.published = self.served = self.max_held = self.stale_dropped = 0
        self.node_of_rank: dict[int, str] = {}

    async def new_attempt(self) -> int:
        """Start a new attempt (called once by rank 0 of every worker group) and forget
        everything published before it."""
        async with self.changed:
            self.attempt += 1
            self.entries.clear()
            self.changed.notify_all()
            return self.attempt

    async def publish(self, attempt: int, step: int, rank: int, wrapped_ref: list, node_id: str = "") -> None:
        async with self.changed:
            if attempt != self.attempt:
                self.stale_dropped += 1
                return
            self.entries[(attempt, step, rank)] = _Entry(wrapped_ref, readers_left=self.num_students - 1)
            self.published += 1
            self.max_held = max(self.max_held, len(self.entries))
            if node_id:
                self.node_of_rank[rank] = node_id
            self.changed.notify_all()

    async def collect(self, attempt: int, step: int, ranks: list[int], timeout_s: float) -> dict:
        """Wait until every rank in `ranks` has published `step`, then hand out their
        wrapped references (in the order of `ranks`) and count this read.

        Returns {"refs": [[ref], ...]} or, on timeout, {"missing": [rank, ...]}.
        """
        keys = [(attempt, step, r) for r in ranks]
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: attempt != self.attempt or all(k in self.entries for k in keys)),
                    timeout=timeout_s)
            except asyncio.TimeoutError:
                return {"missing": [k[2] for k in keys if k not in self.entries]}
            if attempt != self.attempt:
                return {"superseded": self.attempt}
            refs = []
            for k in keys:
                entry = self.entries[k]
                refs.append(entry.wrapped_ref)
                entry.readers_left -= 1
                if entry.readers_left <= 0:
                    del self.entries[k]
            self.served += len(keys)
            return {"refs": refs}

    async def stats(self) -> BoardStats:
        return BoardStats(self.attempt, self.published, self.served, len(self.entries), self.max_held,
                          self.stale_dropped, dict(self.node_of_rank))


class RayExchange(Exchange):
    """The `Exchange` of one worker: student `student` replica `replica` of K×R workers.

    World rank r trains student r // R, replica r % R; the peers of this worker are the
    workers with the same replica index.

    Two helper threads keep the object store off the training thread (torch releases the
    GIL while it computes): one puts and publishes this worker's predictions, the other
    fetches the peers' predictions for the next step while this one trains.
    """

    def __init__(self, board, num_students: int, replica: int = 0, num_replicas: int = 1,
                 attempt: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.board = board
        self.num_students = num_students
        self.replica = replica
        self.num_replicas = num_replicas
        self.attempt = attempt
        self.timeout_s = timeout_s
        self._node_id = ray.get_runtime_context().get_node_id()
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="exchange-publish")
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="exchange-fetch")
        self._publishing: list[Future] = []
        self._fetches: dict[tuple[int, int], Future] = {}  # (step, student) -> its peers' predictions
        self._closed = threading.Event()

    def rank_of(self, student: int) -> int:
        return student * self.num_replicas + self.replica

    def publish(self, step: int, student: int, pred: CompactPrediction) -> None:
        for done in [f for f in self._publishing if f.done()]:
            self._publishing.remove(done)
            done.result()  # raises what went wrong in an earlier publish
        self._publishing.append(self._publisher.submit(self._publish, step, student, pred))

    def _publish(self, step: int, student: int, pred: CompactPrediction) -> None:
        # The reference goes to the board wrapped in a list, so that Ray passes it on as a
        # reference instead of fetching the object into the board. Fire-and-forget.
        self.board.publish.remote(self.attempt, step, self.rank_of(student), [ray.put(pred)], self._node_id)

    def collect(self, step: int, student: int) -> list[CompactPrediction]:
        if self.num_students == 1:
            return []
        # The loop collects steps in order: the previous collect started fetching this one.
        fetch = self._fetches.pop((step, student), None) or self._fetcher.submit(self._fetch, step, student)
        predictions = fetch.result()
        self._fetches[(step + 1, student)] = self._fetcher.submit(self._fetch, step + 1, student)
        return predictions

    def _fetch(self, step: int, student: int) -> list[CompactPrediction]:
        ranks = [self.rank_of(j) for j in range(self.num_students) if j != student]
        started = time.monotonic()
        answer_ref = self.board.collect.remote(self.attempt, step, ranks, self.timeout_s)
        while True:  # the board answers within timeout_s; wake up now and then to see if we closed
            try:
                answer = ray.get(answer_ref, timeout=0.25)
                break
            except ray.exceptions.GetTimeoutError:
                if self._closed.is_set():
                    return []
        if "missing" in answer:
            missing = ", ".join(f"student {r // self.num_replicas} (worker rank {r}, replica {self.replica})"
                                for r in answer["missing"])
            raise ExchangeTimeout(
                f"exchange: student {student} waited {time.monotonic() - started:.0f} s for step {step} "
                f"(attempt {self.attempt}) and got nothing from {missing}: that worker is stuck, slow or dead")
        if "superseded" in answer:
            raise RuntimeError(f"exchange: attempt {self.attempt} was superseded by attempt "
                               f"{answer['superseded']} (the worker group restarted)")
        predictions = ray.get([wrapped[0] for wrapped in answer["refs"]])
        # Copies: objects from the store are read-only views; the loop may write to them.
        return [CompactPrediction(np.array(p.label), np.array(p.confidence)) for p in predictions]

    def close(self) -> None:
        """Finish publishing (peers may still need this worker's last predictions) and drop
        the fetch of a step that will never come."""
        self._publisher.shutdown(wait=True)
        self._closed.set()
        self._fetcher.shutdown(wait=True, cancel_futures=True)


class PublishOnCollect(Exchange):
    """The exchange without the one-step lookahead, for benchmarks: publishes are held
    back until the same step is collected, so every step waits for a full round trip."""

    def __init__(self, inner: Exchange):
        self.inner = inner
        self.num_students = inner.num_students
        self.held: list[tuple[int, int, CompactPrediction]] = []

    def publish(self, step: int, student: int, pred: CompactPrediction) -> None:
        self.held.append((step, student, pred))

    def collect(self, step: int, student: int) -> list[CompactPrediction]:
        due = [h for h in self.held if h[0] <= step]
        self.held = [h for h in self.held if h[0] > step]
        for s, k, pred in due:
            self.inner.publish(s, k, pred)
        return self.inner.collect(step, student)
