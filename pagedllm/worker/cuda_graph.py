"""CUDA graphs for decode-only steps at padded batch sizes.

A decode step at batch size n replays the graph captured for the smallest padded size >= n
(1, 2, 4, 8, then multiples of 8 up to 256, of 16 up to 512 and of 32 up to 1024 or
`max_num_seqs`; larger decode batches run eagerly). Every graph reads the runner's
persistent device input buffers (`InputBuffers`), so a replay needs only those refilled; the
padding requests (one token, slot -1, seq_len 1) compute garbage rows that nobody reads.

Attention metadata in a graph is frozen at capture: num_reqs = the padded size, max_query_len
= 1, max_seq_len = max_model_len, and a split-KV count. The attention backend names the
variants a size is captured in (`decode_graph_variants`: e.g. unsplit and split for mid-sized
batches) and picks one per step from the step's real lengths (`pick_decode_graph_variant`);
the split kernel sizes its partitions from each request's own length at run time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pagedllm.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


# Decode batches past this run eagerly. vLLM stops at 512; on the H200 an eager decode step
# of ~1000 requests (decode-heavy) took more host time to launch and bookkeep than its ~35 ms
# of GPU work, so the GPU idled ~9 ms a step: graphs go on to 1024 (16 more, ~2 s capture).
MAX_CAPTURE_SIZE = 1024


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes: 1, 2, 4, then steps of 8 up to 256, of 16 up to 512 and of
    32 up to 1024, capped at max_num_seqs (included)."""
    cap = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= cap]
    sizes += list(range(8, min(cap, 256) + 1, 8)) + list(range(272, min(cap, 512) + 1, 16))
    sizes += list(range(544, cap + 1, 32))
    if cap not in sizes:
        sizes.append(cap)
    return sorted(sizes)


def padded_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size >= n, or None when n is past the largest."""
    for s in sizes:
        if s >= n:
            return s
    return None


Variant = int | None  # a split-KV count (None: the backend's choice)


class CudaGraphRunner:
    """Captures and replays `forward(num_tokens, metadata) -> hidden [num_tokens, hidden]`."""

    def __init__(self, sizes: list[int], capture_error_mode: str = "global") -> None:
        self.sizes = sizes
        # "thread_local" under tensor parallelism: NCCL's watchdog thread queries events
        # while this thread captures, which "global" mode turns into a capture error.
        self.capture_error_mode = capture_error_mode
        self.variants: dict[int, tuple[Variant, ...]] = {}
        self.graphs: dict[tuple[int, Variant], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, Variant], torch.Tensor] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def capture(
        self,
        forward: Callable[[int, AttentionMetadata], torch.Tensor],
        make_metadata: Callable[[int], AttentionMetadata],
        variants_for: Callable[[int], tuple[Variant, ...]] = lambda size: (None,),
    ) -> None:
        """Captures each size in each of its variants, largest first so smaller ones reuse
        its memory pool."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in sorted(self.sizes, reverse=True):
                self.variants[size] = variants_for(size)
                for variant in self.variants[size]:
                    md = make_metadata(size)
                    for m in md.group_metadata or (md,):  # every KV cache group's (md first)
                        m.num_splits = variant
                    # One warm-up outside the graph: the kernels of this size and variant
                    # compiled (Triton) and planned (cuBLAS) before capture.
                    forward(size, md)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream,
                                          capture_error_mode=self.capture_error_mode):
                        out = forward(size, md)
                    if self.pool is None:
                        self.pool = graph.pool()
                    self.graphs[size, variant] = graph
                    self.outputs[size, variant] = out
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        logger.info(
            "captured %d CUDA graphs (decode batch sizes %d..%d) in %.2f s",
            len(self.graphs), min(self.sizes), max(self.sizes), self.capture_seconds,
        )

    def size_for(self, num_reqs: int) -> int | None:
        if not self.graphs:
            return None
        return padded_size(self.sizes, num_reqs)

    def replay(self, size: int, variant: Variant = None) -> torch.Tensor:
        """Runs the graph of `size` (in `variant`); returns its static output [size, hidden]."""
        self.graphs[size, variant].replay()
        return self.outputs[size, variant]
