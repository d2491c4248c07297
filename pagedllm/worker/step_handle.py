"""StepHandle: a submitted step whose sampled tokens reach the host when `get()` is called."""

from __future__ import annotations

import torch

from pagedllm.core.scheduler_output import ModelRunnerOutput
from pagedllm.engine.protocol import LogprobsLists
from pagedllm.sample.sampler import SamplerOutput
from pagedllm.worker.input_batch import CachedRequestState


class StepHandle:
    """A submitted step. `get()` waits (once) for its sampled tokens, appends them to the
    requests' states and returns the step's output; later calls return the same output."""

    def __init__(
        self,
        out: ModelRunnerOutput,
        sample_rows: list[int] | None = None,
        sample_states: list[CachedRequestState] | None = None,
        result: SamplerOutput | None = None,
    ) -> None:
        self._out = out
        self._rows = sample_rows or []
        self.sample_states = sample_states or []  # row j of the sampled tensor
        self._done = result is None
        if result is None:
            return
        self.sampled_device = result.sampled_token_ids
        lp = result.logprobs
        host = [result.sampled_token_ids] + (
            [lp.token_ids, lp.logprobs, lp.ranks] if lp is not None else []
        )
        self._event = None
        if self.sampled_device.device.type == "cuda":
            # Non-blocking copies into pinned memory; the event marks their completion.
            host = [_pinned_copy(t) for t in host]
            self._event = torch.cuda.Event()
            self._event.record()
        self._host = host

    def ready(self) -> bool:
        """Whether `get()` would return without waiting on the device."""
        return self._done or self._event is None or self._event.query()

    def get(self) -> ModelRunnerOutput:
        if self._done:
            return self._out
        self._done = True
        if self._event is not None:
            self._event.synchronize()
        sampled = self._host[0].tolist()
        out = self._out
        out_ids = out.sampled_token_ids
        for i, state, tok in zip(self._rows, self.sample_states, sampled):
            state.output_token_ids.append(tok)
            state.num_pending -= 1
            out_ids[i] = [tok]
        if len(self._host) > 1:
            lp = [t.tolist() for t in self._host[1:]]
            for j, state in enumerate(self.sample_states):
                num_lp = state.sampling_params.logprobs
                if num_lp is not None:
                    out.logprobs[state.req_id] = LogprobsLists(
                        [lp[0][j][: num_lp + 1]], [lp[1][j][: num_lp + 1]], [lp[2][j]]
                    )
        self._host = []
        return out


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
