"""Per-request limits of the server (`--max-n`, `--max-stop-strings`, `--max-logit-bias`) and
backpressure (`--max-waiting-requests`: new requests are refused while that many engine
requests wait to be scheduled).

Every generation endpoint calls `RequestLimits.check(req, engine)` before anything is queued,
so a request that would hold the engine (n=100000, a million stop strings) or join an
overlong queue is refused at once in the OpenAI error shape: a 400 naming the field, or a
503 with `Retry-After` when the queue is full.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.entrypoints.openai.errors import APIError

DEFAULT_MAX_N = 128  # OpenAI's limit on n
DEFAULT_MAX_STOP_STRINGS = 64
DEFAULT_MAX_LOGIT_BIAS = 1024
DEFAULT_MAX_REQUEST_BODY_MB = 32.0
RETRY_AFTER_S = 1


@dataclass(slots=True, frozen=True)
class RequestLimits:
    max_n: int = DEFAULT_MAX_N
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_logit_bias: int = DEFAULT_MAX_LOGIT_BIAS
    max_waiting_requests: int | None = None  # None: the queue is unbounded

    def check(self, req, engine=None) -> None:
        """Raises APIError for a request over a limit; `engine` (an AsyncLLM) enables the
        waiting-queue check."""
        self._check_n(req)
        stop = req.stop
        num_stop = 0 if stop is None else (1 if isinstance(stop, str) else len(stop))
        if num_stop > self.max_stop_strings:
            raise APIError(
                f"stop: at most {self.max_stop_strings} stop strings are allowed; got {num_stop}",
                400, param="stop",
            )
        num_bias = len(req.logit_bias or {})
        if num_bias > self.max_logit_bias:
            raise APIError(
                f"logit_bias: at most {self.max_logit_bias} entries are allowed; got {num_bias}",
                400, param="logit_bias",
            )
        if engine is not None and self.max_waiting_requests is not None:
            self._check_queue(engine)

    def _check_n(self, req) -> None:
        for field in ("n", "best_of"):
            value = getattr(req, field, None)
            if value is None:
                continue
            if value < 1:
                raise APIError(f"{field}: must be at least 1; got {value}", 400, param=field)
            if value > self.max_n:
                raise APIError(
                    f"{field}: must be at most {self.max_n} (--max-n); got {value}",
                    400, param=field,
                )

    def _check_queue(self, engine) -> None:
        # A request is admitted while fewer than the limit wait, whatever its n: one that is
        # large on its own is bounded by --max-n, not refused forever.
        waiting = num_waiting(engine)
        if waiting >= self.max_waiting_requests:
            raise APIError(
                f"The server is overloaded: {waiting} requests are waiting (limit "
                f"{self.max_waiting_requests}, --max-waiting-requests). Retry later.",
                503, code="server_overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )


def num_waiting(engine) -> int:
    """Requests queued but not running, over every replica: the waiting ones of each replica's
    latest stats plus those routed to it since (not scheduled yet, so waiting too)."""
    return sum(r.num_waiting + r.num_pending for r in engine.engines.balancer.replicas if r.alive)

