"""The scheduler's waiting queues: arrival order ("fcfs") or (priority, arrival time)
("priority", as vLLM's `--scheduling-policy priority`: lower values first)."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from pagedllm.core.request import Request


class FCFSQueue(deque):
    """Waiting requests in arrival order; preempted ones go back to the front."""

    def remove_ids(self, ids: set[str]) -> None:
        kept = [r for r in self if r.request_id not in ids]
        self.clear()
        self.extend(kept)


class PriorityQueue:
    """Waiting requests by (priority, arrival time); preempted ones go back by the same key.
    The deque operations the scheduler uses, on a heap."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()  # ties: insertion order, and never compares requests

    def append(self, request: Request) -> None:
        entry = (request.priority, request.arrival_time, next(self._seq), request)
        heapq.heappush(self._heap, entry)

    appendleft = append

    def __getitem__(self, index: int) -> Request:
        if index != 0:
            raise IndexError("only the head of the priority queue can be read")
        return self._heap[0][3]

    def popleft(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove_ids(self, ids: set[str]) -> None:
        self._heap = [e for e in self._heap if e[3].request_id not in ids]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[3] for e in sorted(self._heap))
