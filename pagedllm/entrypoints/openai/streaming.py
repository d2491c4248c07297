"""Server-sent events and request-lifetime helpers shared by the endpoints.

- `sse(obj)` / `SSE_DONE`: the exact OpenAI framing (`data: <json>\\n\\n`, `data: [DONE]\\n\\n`).
- `merge(iterators)`: interleaves several async iterators (one per prompt of a completions
  request), tagging each item with its iterator's index; closing it closes every source.
- `run_until_disconnected(request, coro)`: runs a non-streamed request's work and cancels it
  (which aborts it in the engine) as soon as the client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def sse(obj: Any) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


def json_bytes(obj: Any) -> bytes:
    return _encoder.encode(obj)


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it and raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yields (index, item) from all iterators as items arrive; errors propagate."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item))
        except BaseException as e:
            queue.put_nowait((i, e))
            return
        queue.put_nowait((i, done_marker))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
