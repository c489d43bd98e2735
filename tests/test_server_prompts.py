"""``--prompt-dir``: registered prompts survive a restart; damaged or foreign files are skipped, never run."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_server import TIMEOUT, _tokens, running_server

from token2wav.serve.app import create_app
from token2wav.serve.client import stream_tokens
from token2wav.serve.prompt_store import PromptStore, prompt_id
from token2wav.serve.protocol import ServerLimits

LIMITS = ServerLimits(max_sessions=4, max_tokens_per_session=400, workers=2)


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    return Token2Wav.from_pretrained("tiny")


def _prompt_body(seed: int, vocab: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": _tokens(10, seed, vocab),
        "mel": rng.random((20, 80)).astype(np.float32).round(4).tolist(),
        "embedding": rng.random(192).astype(np.float32).round(4).tolist(),
    }


def _stream(addr: str, tokens: list[int], pid: str) -> np.ndarray:
    res = asyncio.run(stream_tokens(f"ws://{addr}/v1/stream", tokens, rate=0, prompt_id=pid))
    return np.frombuffer(res.pcm, "<i2")


class Boom:
    """Unpickling this would create a file: proof that a prompt file was executed."""

    marker: Path

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def test_prompts_survive_a_restart_and_bad_files_are_skipped(engine: Any, tmp_path: Path, caplog) -> None:
    vocab = int(engine.config.vocab_size)
    folder = tmp_path / "prompts"
    tokens = _tokens(40, 7, vocab)
    with running_server(create_app(engine, name="a", limits=LIMITS, prompt_dir=str(folder))) as addr:
        r = httpx.post(f"http://{addr}/v1/prompts", json=_prompt_body(1, vocab), timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        pid = r.json()["prompt_id"]
        before = _stream(addr, tokens, pid)
    assert sorted(p.name for p in folder.iterdir()) == [f"{pid}.npz"]  # no temporary file left behind

    # damage: a truncated copy under another valid-looking id, random bytes, a foreign file, a pickle bomb,
    # arrays that are fine but of another vocabulary, and a write interrupted by a crash
    good = (folder / f"{pid}.npz").read_bytes()
    (folder / "p_000000000000000000000001.npz").write_bytes(good[: len(good) // 2])
    (folder / "p_000000000000000000000002.npz").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "notes.txt").write_text("not a prompt")
    boom = Boom()
    Boom.marker = tmp_path / "executed"
    with open(folder / "p_000000000000000000000003.npz", "wb") as f:
        np.savez(f, tokens=np.array([boom], dtype=object), mel=np.zeros((2, 80)), embedding=np.zeros(192))
    foreign = (np.array([vocab + 5]), np.zeros((2, 80), np.float32), np.zeros(192, np.float32))
    np.savez(folder / f"{prompt_id(*foreign)}.npz", tokens=foreign[0], mel=foreign[1], embedding=foreign[2])
    (folder / ".tmp-crashed.npz").write_bytes(good[:100])

    with caplog.at_level(logging.WARNING, logger="token2wav.serve"):
        app = create_app(engine, name="b", limits=LIMITS, prompt_dir=str(folder))  # the restart
    assert not Boom.marker.exists()
    skipped = [rec.getMessage() for rec in caplog.records if "skipping" in rec.getMessage()]
    assert len(skipped) == 5, skipped
    for name in ("p_000000000000000000000001", "p_000000000000000000000002", "notes.txt", "_000000000000000000000003"):
        assert any(name in msg for msg in skipped), (name, skipped)
    assert any("outside [0," in msg for msg in skipped)
    assert not (folder / ".tmp-crashed.npz").exists()
    assert list(app.state.server.prompts) == [pid]
    with np.load(folder / "p_000000000000000000000003.npz", allow_pickle=True) as live:
        live["tokens"]  # the bomb is live: loading it with pickles allowed does run it
    assert Boom.marker.exists()

    with running_server(app) as addr:
        after = _stream(addr, tokens, pid)
        r = httpx.post(f"http://{addr}/v1/synthesize", json={"tokens": tokens, "prompt_id": pid}, timeout=TIMEOUT)
        assert r.status_code == 200
    # the prompt's arrays read back exactly, the same engine and calls on the same shapes (no batcher): bit for bit
    assert np.array_equal(before, after)


def test_prompt_dropped_from_memory_is_reloaded_from_disk(engine: Any, tmp_path: Path) -> None:
    vocab = int(engine.config.vocab_size)
    limits = ServerLimits(max_sessions=2, max_tokens_per_session=400, workers=2, max_prompts=1)
    with running_server(create_app(engine, name="lru", limits=limits, prompt_dir=str(tmp_path))) as addr:
        ids = [
            httpx.post(f"http://{addr}/v1/prompts", json=_prompt_body(s, vocab), timeout=TIMEOUT).json()["prompt_id"]
            for s in (2, 3)
        ]
        assert len(set(ids)) == 2
        r = httpx.post(f"http://{addr}/v1/synthesize", json={"tokens": [1, 2, 3], "prompt_id": ids[0]},
                       timeout=TIMEOUT)
        assert r.status_code == 200, r.text  # dropped from memory (max_prompts=1), read back from disk
        r = httpx.post(f"http://{addr}/v1/synthesize", json={"tokens": [1, 2, 3], "prompt_id": "p_" + "0" * 24},
                       timeout=TIMEOUT)
        assert r.status_code == 404


def test_interrupted_write_leaves_no_entry(tmp_path: Path, monkeypatch) -> None:
    store = PromptStore(tmp_path, vocab_size=10)
    arrays = (np.array([1, 2]), np.ones((4, 80), np.float32), np.ones(192, np.float32))
    pid = prompt_id(*arrays)

    def crash(*_a: Any, **_k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(pid, *arrays)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    store.save(pid, *arrays)
    assert [p.name for p in tmp_path.iterdir()] == [f"{pid}.npz"]
    got = store.load(pid)
    assert got is not None and all(np.array_equal(a, b) for a, b in zip(got, arrays))  # copies, bit for bit
    assert store.load("../../etc/passwd") is None and store.load("p_" + "1" * 24) is None
    (tmp_path / f"{pid}.npz").write_bytes(b"damaged")  # registering the prompt again repairs its file
    assert store.load(pid) is None
    store.save(pid, *arrays)
    assert store.load(pid) is not None
    with pytest.raises(ValueError, match="not a directory"):
        PromptStore(tmp_path / f"{pid}.npz", vocab_size=10)


def test_store_keeps_the_first_arrays_under_an_id_and_catches_renamed_files(tmp_path: Path, caplog) -> None:
    """Ids of recordings are not hashes of the arrays: the file carries its id; the first arrays stored win."""
    store = PromptStore(tmp_path, vocab_size=10)
    first = (np.array([1, 2]), np.ones((4, 80), np.float32), np.ones(192, np.float32))
    later = (first[0], np.nextafter(first[1], np.float32(2)), first[2])  # the same recording on another CPU
    pid = "p_" + "ab" * 12  # an id that names audio, not these arrays
    kept = store.save(pid, *first)
    assert all(np.array_equal(a, b) for a, b in zip(kept, first))  # stored arrays are copies: bit for bit
    kept = store.save(pid, *later)
    assert all(np.array_equal(a, b) for a, b in zip(kept, first))  # the first registration is served
    assert np.array_equal(store.load(pid)[1], first[1])
    other = "p_" + "cd" * 12
    (tmp_path / f"{pid}.npz").rename(tmp_path / f"{other}.npz")
    with caplog.at_level(logging.WARNING, logger="token2wav.serve"):
        assert store.load(other) is None
    assert "renamed" in caplog.text
    legacy = tmp_path / f"{prompt_id(*first)}.npz"  # a file of the earlier layout: three arrays, named by hash
    np.savez(legacy, tokens=first[0], mel=first[1], embedding=first[2])
    assert store.load(prompt_id(*first)) is not None


def _damaged_archives(folder: Path, good: tuple[np.ndarray, ...]) -> list[str]:
    """Files that once stopped the server from starting: a broken deflate stream, an array header declaring
    80 TiB, a zip member that unpacks far beyond the file limit. Each is named like a valid prompt."""
    import io
    import zipfile

    names = []
    # 1. a deflated member whose stream is garbage
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for key, arr in zip(("tokens", "mel", "embedding"), good):
            b = io.BytesIO()
            np.save(b, arr)
            z.writestr(f"{key}.npy", b.getvalue())
    raw = bytearray(buf.getvalue())
    start = raw.index(b"mel.npy") + len("mel.npy")
    raw[start + 20 : start + 60] = bytes(range(40))
    names.append("p_" + "1" * 24)
    (folder / f"{names[-1]}.npz").write_bytes(bytes(raw))
    # 2. a header declaring a [2**43] float32 array (32 TiB of data) in a small member
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 43,)})
    with zipfile.ZipFile(folder / f"{'p_' + '2' * 24}.npz", "w") as z:
        z.writestr("tokens.npy", header.getvalue() + b"\0" * 64)
        z.writestr("mel.npy", header.getvalue())
        z.writestr("embedding.npy", header.getvalue())
    names.append("p_" + "2" * 24)
    # 3. a member that inflates to 200 MB from a few hundred KB
    with zipfile.ZipFile(folder / f"{'p_' + '3' * 24}.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("mel.npy", header.getvalue() + b"\0" * (200 << 20))
    names.append("p_" + "3" * 24)
    return names


def test_damaged_prompt_files_never_stop_the_server(engine: Any, tmp_path: Path, caplog) -> None:
    import resource

    vocab = int(engine.config.vocab_size)
    folder = tmp_path / "prompts"
    folder.mkdir()
    good = (np.array([1, 2, 3]), np.ones((6, 80), np.float32), np.ones(192, np.float32))
    PromptStore(folder, vocab).save(prompt_id(*good), *good)
    bad = _damaged_archives(folder, good)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with caplog.at_level(logging.WARNING, logger="token2wav.serve"):
        app = create_app(engine, name="damaged", limits=LIMITS, prompt_dir=str(folder))
        with running_server(app) as addr:
            ids = httpx.get(f"http://{addr}/v1/voices", timeout=TIMEOUT).json()["prompts"]
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) < (100 << 10)  # KiB: nothing unpacked
    assert prompt_id(*good) in ids and not set(bad) & set(ids)
    lines = [r.getMessage() for r in caplog.records if "prompt store: skipping" in r.getMessage()]
    for pid in bad:
        assert sum(pid in line for line in lines) == 1, (pid, lines)  # one warning line per skipped file


def test_a_voice_name_given_as_prompt_id_is_told_where_its_id_is() -> None:
    from token2wav import Token2Wav
    from token2wav.serve.protocol import ProtocolError

    state = create_app(Token2Wav.from_pretrained("demo"), limits=LIMITS).state.server
    with pytest.raises(ProtocolError) as voice:
        state.lookup_prompt("slt")
    assert voice.value.message == ("unknown prompt_id 'slt'; register it with POST /v1/prompts ('slt' is one of the "
                                   "model's voices: GET /v1/voices gives its prompt_id)")
    with pytest.raises(ProtocolError) as other:
        state.lookup_prompt("p_nope")
    assert other.value.message == "unknown prompt_id 'p_nope'; register it with POST /v1/prompts"
