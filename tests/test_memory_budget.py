"""One memory budget (``--max-cache-mb``) for key/value pages, prompt states, the prompt registry and the
fixed-shape buffers: each bounded in bytes, each shown in /metrics, on a real server on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from test_server import TIMEOUT, _tokens, running_server

from token2wav.budget import KV_SHARE, SHARES, BudgetedLRU, MemoryBudget, tensor_bytes
from token2wav.serve.app import create_app
from token2wav.serve.client import stream_tokens
from token2wav.serve.metrics import parse_exposition
from token2wav.serve.protocol import ServerLimits


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    return Token2Wav.from_pretrained("tiny")


def test_lru_drops_the_oldest_to_fit_and_keeps_nothing_too_large() -> None:
    budget = MemoryBudget(7500)  # the registry's share: 8 % = 600 bytes, whatever the other accounts hold
    budget.set_used("kv_pages", 7000)
    budget.set_used("prompt_states", 900)
    lru = BudgetedLRU(budget, "prompt_registry", maxsize=10)
    for k in range(5):
        assert lru.put(k, object(), 150)
    assert list(lru) == [1, 2, 3, 4] and budget.used("prompt_registry") == 4 * 150  # 0 dropped for 4
    lru.get(1)  # used: now the newest
    assert lru.put("big", object(), 290)
    assert list(lru) == [4, 1, "big"] and budget.used("prompt_registry") == 590  # 2 and 3 dropped
    assert not lru.put("huge", object(), 601)  # more than the whole share: not kept, and nothing dropped for it
    assert "huge" not in lru and list(lru) == [4, 1, "big"] and budget.used("prompt_registry") == 590
    other = BudgetedLRU(MemoryBudget(), "prompt_states", maxsize=2)
    for k in range(3):
        other.put(k, torch.zeros(10))
    assert list(other) == [1, 2] and other.nbytes == 80
    assert abs(sum(SHARES.values()) - 1.0) < 1e-12


def test_tensor_bytes_counts_each_storage_once() -> None:
    a = torch.zeros(100)
    assert tensor_bytes({"x": a, "view": a[10:20], "list": [a, torch.ones(3, dtype=torch.float64)]}) == 400 + 24


def test_a_budget_too_small_for_one_chunk_is_refused_with_the_minimum(engine: Any) -> None:
    with pytest.raises(ValueError, match=r"max_cache_bytes=200000 cannot hold one chunk of one stream: at least "
                                         r"1872458 bytes \(1.79 MiB"):
        engine.batcher(max_cache_bytes=200_000)
    least = 1872458
    engine.batcher(max_cache_bytes=least).close()  # the minimum is enough for one chunk
    # the server's option, in MiB rounded up to what it prints: enough too
    with pytest.raises(ValueError, match=r"key/value pages; token2wav serve --max-cache-mb 1\.79\)$"):
        engine.batcher(max_cache_bytes=200_000)
    engine.batcher(max_cache_bytes=int(1.79 * 2**20)).close()


@pytest.mark.parametrize("model", ["demo", "tiny", "real_configs/cosyvoice2.yaml", "real_configs/cosyvoice3.yaml"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_configs_key_value_bytes_per_frame_are_the_built_flows(model: str, dtype: torch.dtype) -> None:
    # what serve checks --max-cache-mb against before loading == what the batcher reads off the loaded flow
    from pathlib import Path

    from token2wav.config import read_config
    from token2wav.loading import build_flow, resolve_model_dir
    from token2wav.memory import kv_bytes_per_frame
    from token2wav.streaming.batcher import cache_bytes_per_frame

    path = Path(__file__).parent / "data" / model if model.endswith(".yaml") else resolve_model_dir(model)
    config = read_config(path)
    flow = build_flow(config, device="meta").to(dtype)
    assert kv_bytes_per_frame(config, dtype, n_timesteps=7) == cache_bytes_per_frame(flow, 7) > 0


def test_serve_refuses_a_budget_too_small_for_one_chunk_before_loading(capsys, monkeypatch) -> None:
    import token2wav.serve.assembly as assembly
    from token2wav import cli

    def refuse(*args, **kwargs):
        raise AssertionError("the server was built before the budget was refused")

    monkeypatch.setattr(assembly, "build_server", refuse)
    assert cli.main(["serve", "--model", "tiny", "--max-cache-mb", "1"]) == 2
    # the message the batcher gives (tested above): 1,872,458 bytes at least, 1.79 MiB
    assert capsys.readouterr().err.strip() == (
        "token2wav serve: error: max_cache_bytes=1048576 cannot hold one chunk of one stream: at least 1872458 "
        "bytes (1.79 MiB; 70% of the budget is for key/value pages; token2wav serve --max-cache-mb 1.79)")


def _prompt_body(seed: int, vocab: int, tokens: int = 40) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"tokens": _tokens(tokens, seed, vocab), "mel": rng.random((2 * tokens, 80)).round(3).tolist(),
            "embedding": rng.random(192).round(3).tolist()}


def test_server_caches_stay_inside_one_budget(engine: Any) -> None:
    vocab = int(engine.config.vocab_size)
    budget = 32 << 20  # 22.4 MiB of key/value pages; 2.56 MiB for the registry
    batcher = engine.batcher(max_cache_bytes=budget, graphs=True)  # graphs: fixed-shape buffers (eager on a CPU)
    app = create_app(engine, name="budget", limits=ServerLimits(workers=2, max_prompts=1000), batcher=batcher)
    try:
        with running_server(app) as addr:
            base = f"http://{addr}"
            for seed in range(40):  # 40 long prompts of 256 KB of mel each: 10 MB, more than the registry's share
                r = httpx.post(base + "/v1/prompts", json=_prompt_body(seed, vocab, 400), timeout=TIMEOUT)
                assert r.status_code == 200, r.text
            held = parse_exposition(httpx.get(base + "/metrics", timeout=TIMEOUT).text)
            ids = [httpx.post(base + "/v1/prompts", json=_prompt_body(100 + i, vocab, 20), timeout=TIMEOUT)
                   .json()["prompt_id"] for i in range(6)]

            async def streams() -> list[Any]:
                return await asyncio.gather(*(stream_tokens(f"ws://{addr}/v1/stream", _tokens(60, i, vocab), rate=0,
                                                            prompt_id=pid) for i, pid in enumerate(ids)))

            for res in asyncio.run(streams()):
                assert len(res.pcm) > 0
            # and one alone: on a busy machine all six share every call, a padded shape too large for the
            # fixed-shape account's share is used and not kept, and the account may end empty; a lone stream's is kept
            lone = asyncio.run(stream_tokens(f"ws://{addr}/v1/stream", _tokens(60, 9, vocab), rate=0, prompt_id=ids[0]))
            assert len(lone.pcm) > 0
            m = parse_exposition(httpx.get(base + "/metrics", timeout=TIMEOUT).text)
    finally:
        batcher.close()
    # the registry dropped its oldest prompts to stay inside: fewer than the 40 registered were held
    assert 5 < held["token2wav_prompts_registered"] < 40
    accounts = {a: m[f'token2wav_memory_bytes{{account="{a}"}}'] for a in
                ("kv_pages", "prompt_states", "prompt_registry", "fixed_shape_buffers")}
    assert m["token2wav_memory_budget_bytes"] == budget
    assert 0 < accounts["kv_pages"] <= KV_SHARE * budget  # the pool, allocated once at its share
    assert accounts["prompt_states"] > 0 and accounts["prompt_registry"] > 0 and accounts["fixed_shape_buffers"] > 0
    assert sum(accounts.values()) <= budget
    for account, nbytes in accounts.items():
        assert nbytes <= SHARES[account] * budget, account
    assert accounts["prompt_registry"] == app.state.server.prompts.nbytes
    assert accounts["prompt_states"] == engine.prompt_cache.nbytes


def test_without_a_batcher_the_budget_still_bounds_the_caches(engine: Any) -> None:
    """`serve --no-batching --max-cache-mb`: a batch of one; prompt states and the registry keep to their
    shares; a prompt larger than the registry's whole share is refused with 503."""
    vocab = int(engine.config.vocab_size)
    batch_of_one = engine.batcher(max_batch=1, max_cache_bytes=4 << 20)  # --no-batching: a batch of one
    memory = batch_of_one.memory  # the registry's share: 335 KB
    app = create_app(engine, name="nobatch", limits=ServerLimits(workers=1), batcher=batch_of_one)
    with running_server(app) as addr:
        base = f"http://{addr}"
        for seed in range(4):  # 128 KB of mel each: two fit
            assert httpx.post(base + "/v1/prompts", json=_prompt_body(seed, vocab, 200), timeout=TIMEOUT).is_success
        r = httpx.post(base + "/v1/prompts", json=_prompt_body(9, vocab, 700), timeout=TIMEOUT)  # 448 KB of mel
        assert r.status_code == 503 and "memory budget" in r.json()["error"], r.text
    assert len(app.state.server.prompts) == 2
    assert memory.used("prompt_registry") <= SHARES["prompt_registry"] * (4 << 20)


def test_tensor_bytes_does_not_count_a_model_a_state_refers_to() -> None:
    class State:
        def __init__(self) -> None:
            self.keys = torch.zeros(50)
            self.layer = torch.nn.Linear(100, 100)  # its 40 KB of weights are the model's

    assert tensor_bytes(State()) == 200
