"""InputBuffers.prepare against a per-token reference; graph sizes; bench workloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm.entrypoints.bench import TINY_LLAMA, make_workload, roofline, summarize_timeline
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.cuda_graph import capture_sizes, padded_size
from pagedllm.worker.gpu_input_batch import InputBuffers
from pagedllm.worker.input_batch import CachedRequestState, build_sampling_metadata, step_seed


def _state(rng, i: int, prompt_len: int, out_len: int, computed: int, bs: int):
    total = prompt_len + out_len
    blocks = rng.permutation(200)[: -(-(total + 1) // bs)].tolist()
    return CachedRequestState(
        req_id=str(i),
        prompt_token_ids=rng.integers(0, 1000, prompt_len).tolist(),
        output_token_ids=rng.integers(0, 1000, out_len).tolist(),
        sampling_params=SamplingParams(temperature=0.0),
        block_ids=blocks,
        num_computed_tokens=computed,
    )


def test_prepare_matches_per_token_reference():
    rng = np.random.default_rng(0)
    bs = 16
    buf = InputBuffers(512, 8, 16, bs, torch.device("cpu"))
    for _ in range(5):
        states, counts = [], []
        for i in range(6):
            p, o = int(rng.integers(1, 60)), int(rng.integers(0, 20))
            if o > 0:  # decode of the last token
                computed, n = p + o - 1, 1
            else:  # a prefill chunk, maybe not reaching the end of the prompt
                computed = int(rng.integers(0, p))
                n = int(rng.integers(1, p - computed + 1))
            states.append(_state(rng, i, p, o, computed, bs))
            counts.append(n)
        step = buf.prepare(states, counts)
        ids, pos, slots, sample_idx = [], [], [], []
        off = 0
        for s, n in zip(states, counts):
            start = s.num_computed_tokens
            for t in range(start, start + n):
                ids.append(s.token_slice(t, t + 1)[0])
                pos.append(t)
                slots.append(s.block_ids[t // bs] * bs + t % bs)
            off += n
            if start + n == s.num_tokens:
                sample_idx.append(off - 1)
        total = sum(counts)
        assert step.num_tokens == total
        assert buf.input_ids[:total].tolist() == ids
        assert buf.positions[:total].tolist() == pos
        assert buf.slot_mapping[:total].tolist() == slots
        assert buf.query_start_loc[: 7].tolist() == [0, *np.cumsum(counts).tolist()]
        assert buf.seq_lens[:6].tolist() == [s.num_computed_tokens + n
                                             for s, n in zip(states, counts)]
        assert step.sample_token_idx.tolist() == sample_idx
        assert step.max_seq_len == max(s.num_computed_tokens + n for s, n in zip(states, counts))
        for i, s in enumerate(states):
            assert buf.block_table[i, : len(s.block_ids)].tolist() == s.block_ids


def test_prepare_pads_decode_batch_for_graphs():
    rng = np.random.default_rng(1)
    buf = InputBuffers(64, 8, 8, 16, torch.device("cpu"))
    states = [_state(rng, i, 5, 3, 7, 16) for i in range(3)]
    step = buf.prepare(states, [1, 1, 1], pad_to=4)
    assert step.num_tokens == 3 and step.num_padded_tokens == 4
    assert buf.slot_mapping[3].item() == -1
    assert buf.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    assert buf.seq_lens[:4].tolist() == [8, 8, 8, 1]
    assert buf.input_ids[:3].tolist() == [s.output_token_ids[-1] for s in states]


def test_capture_sizes():
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(256)[-1] == 256
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3]
    big = capture_sizes(1024)
    assert big[-1] == 1024 and 264 not in big and 272 in big and padded_size(big, 600) == 608
    assert 528 not in big and 544 in big and padded_size(capture_sizes(4096), 1025) is None
    sizes = capture_sizes(64)
    assert padded_size(sizes, 3) == 4 and padded_size(sizes, 9) == 16
    assert padded_size(sizes, 64) == 64 and padded_size(sizes, 65) is None


def test_sampling_metadata_common_case_and_pending_tokens():
    rng = np.random.default_rng(2)
    states = [_state(rng, i, 5, 2, 6, 16) for i in range(3)]
    states[0].sampling_params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3)
    md = build_sampling_metadata(states, 1000, torch.device("cpu"))
    assert md.temperature.tolist() == [0.7, 0.0, 0.0] or torch.allclose(
        md.temperature, torch.tensor([0.7, 0.0, 0.0])
    )
    assert md.top_p.tolist()[1:] == [1.0, 1.0] and md.top_k.tolist() == [5, 1000, 1000]
    assert md.repetition_penalty is None and md.banned is None and not md.all_greedy
    assert md.step_seeds == {0: step_seed(3, 2)}
    # A token sampled by a step in flight counts as an output for the seed of the next draw.
    states[0].num_pending = 1
    assert build_sampling_metadata(states, 1000, torch.device("cpu")).step_seeds == {
        0: step_seed(3, 3)
    }
    # min_tokens not reached yet (counting pending tokens) needs the host token ids.
    states[1].sampling_params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    states[1].num_pending = 1
    assert not states[1].needs_host_tokens
    states[1].num_pending = 0
    assert states[1].needs_host_tokens
    assert build_sampling_metadata(states, 1000, torch.device("cpu")).banned == [(1, 7)]


def test_prepare_marks_pending_inputs():
    rng = np.random.default_rng(4)
    buf = InputBuffers(64, 8, 8, 16, torch.device("cpu"))
    states = [_state(rng, 0, 5, 3, 8, 16), _state(rng, 1, 5, 3, 7, 16)]
    states[0].num_pending = 1  # its token at position 8 is still on the device
    step = buf.prepare(states, [1, 1])
    assert step.pending_token_idx == [0] and step.pending_req_ids == ["0"]
    assert buf.positions[:2].tolist() == [8, 7]
    assert buf.input_ids[1].item() == states[1].output_token_ids[-1]
    assert step.sample_rows.tolist() == [0, 1]
    # Two tokens pending: the step at position 8 does not reach the end, so it samples nothing.
    states[0].num_pending = 2
    assert buf.prepare(states, [1, 1]).sample_rows.tolist() == [1]
    # A position past the known tokens with nothing pending is a bookkeeping error.
    states[0].num_pending = 0
    with pytest.raises(RuntimeError, match="past its known tokens"):
        buf.prepare(states, [1, 1])


def test_workloads_follow_benchmarks_md():
    wl = make_workload("sharegpt-shaped", 128256)
    lens_in = np.array([len(p) for p in wl.prompts])
    assert len(wl.prompts) == 1000 and lens_in.min() >= 4 and lens_in.max() <= 2048
    assert 150 < lens_in.mean() < 280 and 140 < np.mean(wl.output_lens) < 260
    assert make_workload("sharegpt-shaped", 128256).prompts[7] == wl.prompts[7]  # seeded
    ss = make_workload("single-stream", 1000)
    assert len(ss.prompts) == 1 and len(ss.prompts[0]) == 512 and ss.output_lens == [256]
    r = roofline(ss, TINY_LLAMA, 256)
    assert r["t_bytes_s"] > r["t_flops_s"] > 0  # one stream is bandwidth-bound


def test_timeline_summary_buckets_steps_and_idle_gaps():
    # (GPU start ms, GPU ms, graph?, tokens, requests)
    tl = [(0.0, 80.0, 0, 8192, 300), (81.0, 5.0, 1, 20, 20), (86.5, 10.0, 1, 300, 300)]
    s = summarize_timeline(tl)
    assert s["eager"] == {"steps": 1, "gpu_s": 0.08, "tokens": 8192}
    assert s["graph batch 1-32"]["steps"] == 1 and s["graph batch 257-max"]["tokens"] == 300
    assert s["gpu_idle_between_steps_s"] == pytest.approx(0.0015)


def test_kv_cache_groups_get_their_own_rows_and_slots_with_freed_entries_null():
    """Group 1 (window 8): row entries before the window of the step's first query are the
    null block; each group's slot mapping reads its own table; rows follow the window as the
    request advances (the cached row is rewritten when its nulled prefix grows)."""
    bs = 4
    buf = InputBuffers(64, 4, 16, bs, torch.device("cpu"), group_windows=(None, 8))
    full, sliding = list(range(10, 20)), list(range(30, 40))
    state = CachedRequestState(
        req_id="a", prompt_token_ids=list(range(1, 38)), output_token_ids=[],
        sampling_params=SamplingParams(temperature=0.0), block_ids=full, num_computed_tokens=20,
        extra_block_ids=(sliding,),
    )  # fmt: skip
    for start, n in ((20, 8), (28, 9)):
        state.num_computed_tokens = start
        buf.prepare([state], [n])
        dead = (start - 8 + 1) // bs  # 3, then 5
        nb = -(-(start + n) // bs)
        assert buf.block_table_np[0, :nb].tolist() == full[:nb]
        assert buf.extra_block_table_cpu[0][0, :nb].tolist() == [0] * dead + sliding[dead:nb]
        pos = np.arange(start, start + n)
        assert buf.slot_mapping_np[:n].tolist() == (np.array(full)[pos // bs] * bs + pos % bs).tolist()
        got = buf.extra_slot_mapping_cpu[0][:n].tolist()
        assert got == (np.array(sliding)[pos // bs] * bs + pos % bs).tolist()


@pytest.mark.parametrize("windows", [(None,), (None, 6), (None, 9, 9)])
def test_block_table_rows_equal_a_rebuild_over_random_steps(windows):
    """Rows are rewritten only when another state wrote them, the state's table grew or its
    window nulled more entries: over random steps (requests arrive, finish, move rows, grow,
    resume as new states, jump ahead by chunks) every used row of every KV cache group still
    equals what a from-scratch fill writes (the null block before the window)."""
    rng = np.random.default_rng(5)
    bs, max_reqs, max_blocks = 4, 6, 16
    buf = InputBuffers(256, max_reqs, max_blocks, bs, torch.device("cpu"), group_windows=windows)
    fresh = InputBuffers(256, max_reqs, max_blocks, bs, torch.device("cpu"),
                         group_windows=windows)  # fmt: skip

    def new_state(i: int, prompt_len: int) -> CachedRequestState:
        st = _state(rng, i, prompt_len, 0, 0, bs)
        st.extra_block_ids = tuple(list(st.block_ids) for _ in windows[1:])
        return st

    live: list[CachedRequestState] = []
    next_id = 0
    for _ in range(300):
        if len(live) < max_reqs and rng.random() < 0.4:
            live.append(new_state(next_id, int(rng.integers(1, 9))))
            next_id += 1
        if live and rng.random() < 0.15:
            live.pop(int(rng.integers(len(live))))  # finished
        if live and rng.random() < 0.1:  # preempted and resumed: a new state, same id
            j = int(rng.integers(len(live)))
            live[j] = new_state(int(live[j].req_id), len(live[j].prompt_token_ids))
        if not live:
            continue
        order = [live[i] for i in rng.permutation(len(live))]  # rows move between steps
        for s in order:  # a decode step for everyone: one more token, maybe a new block
            s.num_computed_tokens = s.num_tokens - 1
            tables = (s.block_ids, *s.extra_block_ids)
            while len(s.block_ids) * bs < s.num_tokens or (
                    len(s.block_ids) < max_blocks and rng.random() < 0.2):
                for t in tables:
                    t.append(int(rng.integers(1, 500)))
        buf.prepare(order, [1] * len(order))
        fresh._row_state = [None] * max_reqs  # forget every row: a from-scratch fill
        fresh.prepare(order, [1] * len(order))
        for g, ((_, bt), (_, ref)) in enumerate(zip(buf._group_np, fresh._group_np)):
            for i, s in enumerate(order):
                n = len(s.block_ids)
                assert bt[i, :n].tolist() == ref[i, :n].tolist()
                dead = min(n, max(0, (s.num_computed_tokens - (windows[g] or 10**9) + 1) // bs))
                assert bt[i, :n].tolist() == [0] * dead + (s.block_ids, *s.extra_block_ids)[g][dead:n]
        for s in order:
            if s.num_tokens < 50:
                s.output_token_ids.extend(rng.integers(0, 1000, int(rng.integers(1, 4))).tolist())
