"""The fixed-shape solve replayed the way a CUDA graph replays it, on a CPU: calls are recorded once per shape
(host values frozen, outside tensors read at the same place, see ``graph_replay``) and later calls with other
rows, positions, prompts and lengths in the same shape are replays; every row still equals its own stream."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA
from graph_replay import CaptureError, record_graph
from tolerances import SOLVE

from token2wav.loading import load_flow
from token2wav.models.buckets import ShapeBuckets
from token2wav.models.kv_pool import KVPool, PageTable
from token2wav.models.padded_solve import PaddedSolver


def test_the_stand_in_replays_like_a_graph():
    """Buffer contents are read at replay; host values and rebound tensors are frozen at capture; a read of a
    device value on the host cannot be captured (so a test of a body with the stand-in can fail)."""
    source, out, scale = torch.ones(3), torch.zeros(3), [2.0]
    holder = {"t": torch.full((3,), 7.0)}

    def body():
        out.copy_(source * scale[0] + holder["t"])

    with torch.inference_mode():
        graph = record_graph(body)
        source.fill_(5.0)
        scale[0] = 10.0  # frozen: the graph still multiplies by 2
        holder["t"] = torch.zeros(3)  # rebound: the graph still adds the old tensor
        graph.replay()
        assert out.tolist() == [17.0, 17.0, 17.0]  # small integers: exact in float32
        for bad, name in ((lambda: out.fill_(source.sum().item()), "aten::item"),
                          (lambda: out.copy_(torch.tensor([1.0, 2.0, 3.0])), "aten::lift_fresh"),
                          (lambda: out.add_(1.0 if bool(source.sum()) else 0.0), "aten::is_nonzero"),
                          (lambda: out.copy_(source[source > 1].sum()), "aten::index")):  # fmt: skip
            with pytest.raises(CaptureError, match=name):
                record_graph(bad)
        record_graph(lambda: out.masked_fill_(source > 1, 0.0))  # a mask as an operand is capturable


@pytest.fixture(scope="module", params=["cv3", "cv2"])
def flow(request):
    """CosyVoice 3 (DiT: rotary terms, two position-conv tails) and CosyVoice 2 (U-Net: a conformer encoder
    before the solve, a tail for each of its causal convs)."""
    return load_flow(DATA / f"{request.param}_config.yaml", DATA / f"{request.param}_flow_state.safetensors")


def _session(flow, prompt_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ratio = flow.token_mel_ratio
    prompt = torch.randint(0, flow.vocab_size, (1, prompt_tokens), generator=g)
    feat = torch.randn(1, prompt_tokens * ratio, 80, generator=g)
    emb = torch.randn(1, flow.spk_embed_dim, generator=g)
    return flow.stream_start(prompt, feat, emb), torch.randint(0, flow.vocab_size, (1, 64), generator=g)


def test_replayed_fixed_shape_solves_equal_each_rows_own_stream(flow):
    """Four calls of three or four rows (new sessions, continuing ones, prompts, last chunks, different push
    sizes) that fall in one shape: it is recorded on the first call, every call is a replay on its own data,
    and every row's mel equals its session alone within SOLVE."""
    layers, heads, width = flow.decoder.estimator.kv_layout()
    pool = KVPool(steps=10, layers=layers, heads=heads, dim_head=width, pages=64)
    recorded = []

    def capture(body):
        recorded.append(record_graph(body))
        return recorded[-1]

    solver = PaddedSolver(flow.decoder, pool, buckets=ShapeBuckets(), graphs=True, capture=capture)
    sessions = {name: _session(flow, p, seed) for name, p, seed in
                (("a", 0, 1), ("b", 10, 2), ("c", 4, 3), ("d", 0, 4), ("e", 7, 5), ("f", 3, 6))}  # fmt: skip
    alone = {name: start for name, (start, _) in sessions.items()}
    paged = dict(alone)
    tables = {name: PageTable(pool) for name in sessions}
    # (session, its tokens so far, last chunk?) per call. Chunks are 50 frames (25 tokens), a step adds the
    # frames of the chunks its tokens complete: 20 to 50 new frames per row and at most 128 keys, so every
    # call is the shape (4 rows, 64 new frames, 128 keys)
    rounds = [
        [("a", 28, False), ("b", 18, False), ("c", 24, False)],
        [("a", 53, False), ("b", 43, False), ("c", 40, True), ("d", 30, False)],
        [("a", 60, True), ("b", 54, True), ("d", 55, False), ("e", 21, False)],
        [("d", 62, True), ("e", 40, True), ("f", 20, True)],
    ]
    with torch.inference_mode():
        for calls in rounds:
            names = [name for name, _, _ in calls]
            tokens = [sessions[name][1][:, :n] for name, n, _ in calls]
            finalize = [last for _, _, last in calls]
            rows = flow.stream_step_rows([paged[n] for n in names], tokens, finalize=finalize,
                                         lookahead=[None] * len(names), tables=[tables[n] for n in names],
                                         padded=solver)  # fmt: skip
            for name, tk, last, (mel, state) in zip(names, tokens, finalize, rows):
                expected, alone[name] = flow.stream_step(alone[name], tk, finalize=last)
                assert mel.shape == expected.shape and mel.shape[-1] > 0
                # a flow solve on padded rows vs the row alone: other GEMM shapes re-associate its sums (SOLVE)
                assert float((mel - expected).abs().max()) <= SOLVE, name
                paged[name] = state
    assert solver.shapes() == [(4, 64, 128)] and solver.captures == len(recorded) == 1
    assert recorded[0].replays == len(rounds)  # recorded on the first call's rows, replayed on every call's
    for table in tables.values():
        table.release()


def test_a_grown_pool_is_recaptured_and_stays_exact(flow):
    """The pool's tensors are reallocated when it grows: the next call of a shape captures again (a replay
    would write into the old tensors) and the rows stay exact."""
    layers, heads, width = flow.decoder.estimator.kv_layout()
    pool = KVPool(steps=10, layers=layers, heads=heads, dim_head=width, pages=4)  # 2 usable: grows soon
    recorded = []

    def capture(body):
        recorded.append(record_graph(body))
        return recorded[-1]

    solver = PaddedSolver(flow.decoder, pool, buckets=ShapeBuckets(), graphs=True, capture=capture)
    (start, toks) = _session(flow, 0, 9)
    alone = paged = start
    table = PageTable(pool)
    grown = []
    with torch.inference_mode():
        for n, last in ((28, False), (53, False), (60, True)):  # 50, 50, 20 new frames
            grown.append(pool.grown)
            [(mel, paged)] = flow.stream_step_rows([paged], [toks[:, :n]], finalize=[last], lookahead=[None],
                                                   tables=[table], padded=solver)  # fmt: skip
            expected, alone = flow.stream_step(alone, toks[:, :n], finalize=last)
            assert mel.shape == expected.shape and float((mel - expected).abs().max()) <= SOLVE  # as above
    assert grown[2] > grown[1] > grown[0]  # the pool grew before each later call
    # the second call's shape was recorded on the first call: recorded again on the grown pool
    assert solver.shapes() == [(1, 32, 128), (1, 64, 128)] and solver.captures == len(recorded) == 3
    table.release()
