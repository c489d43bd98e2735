"""Token files: every accepted format, and clear errors for everything else."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from token2wav.tokens_io import load_prompt_npz, parse_tokens, read_tokens, tokens_from_array

EXPECTED = [12, 0, 7, 4095, 33]


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(EXPECTED),
        json.dumps([EXPECTED]),  # the reference's (1, N) layout
        json.dumps({"tokens": EXPECTED, "text": "hello"}),
        "12 0 7 4095 33\n",
        "12, 0,7 ,\n4095\t33",
        "<|s_12|><|s_0|><|s_7|><|s_4095|><|s_33|>",
        "<|speech_start|> <|s_12|> hi <|s_0|><|s_7|>\n<|s_4095|><|s_33|><|speech_end|>",
        "[12.0, 0, 7, 4095, 33]",
    ],
)
def test_parse_formats(text: str) -> None:
    out = parse_tokens(text)
    assert out.dtype == np.int64 and out.ndim == 1
    assert out.tolist() == EXPECTED


def test_empty_inputs() -> None:
    assert parse_tokens("").size == 0
    assert parse_tokens("  \n").size == 0
    assert parse_tokens("[]").size == 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2", "invalid JSON"),
        ("1 2 three", "cannot read 'three'"),
        ("1 2.5 3", "cannot read '2.5'"),
        ("[1, -2]", ">= 0"),
        ("-1 2", ">= 0"),
        ("[[1, 2], [3]]", "exactly one row"),
        ('{"ids": [1]}', "no 'tokens' key"),
        ('"1 2"', None),  # a JSON string: not a token list (parsed as plain text, fails)
        ("[true, false]", "only integers"),
        ('[1, "2"]', "only integers"),
        ("[1.5]", "integers"),
        ("99999999999999999999999", "64 bits"),
        ("<|s_99999999999999999999999|>", "64 bits"),
    ],
)
def test_parse_errors(text: str, match: str | None) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        parse_tokens(text)


def test_read_npy_file_and_stdin(tmp_path, monkeypatch) -> None:
    arr = np.asarray([EXPECTED], dtype=np.int32)
    path = tmp_path / "t.npy"
    np.save(path, arr)
    assert read_tokens(path).tolist() == EXPECTED
    assert read_tokens(str(path)).tolist() == EXPECTED

    buf = io.BytesIO()
    np.save(buf, arr[0])

    class FakeStdin:
        buffer = io.BytesIO(buf.getvalue())

    monkeypatch.setattr("sys.stdin", FakeStdin())
    assert read_tokens("-").tolist() == EXPECTED


def test_read_text_file_and_binary_object(tmp_path) -> None:
    path = tmp_path / "llm.txt"
    path.write_text("<|s_12|><|s_0|><|s_7|><|s_4095|><|s_33|>")
    assert read_tokens(path).tolist() == EXPECTED
    assert read_tokens(io.BytesIO(b"12 0 7 4095 33")).tolist() == EXPECTED


def test_read_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_tokens(tmp_path / "missing.json")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="neither UTF-8"):
        read_tokens(bad)
    floats = tmp_path / "f.npy"
    np.save(floats, np.asarray([0.5, 1.0]))
    with pytest.raises(TypeError, match="integers"):
        read_tokens(floats)
    cube = tmp_path / "c.npy"
    np.save(cube, np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D"):
        read_tokens(cube)


def test_tokens_from_array_rejects_bool_and_names_parameter() -> None:
    with pytest.raises(TypeError, match="prompt tokens"):
        tokens_from_array(np.asarray([True, False]), name="prompt tokens")


def test_load_prompt_npz(tmp_path) -> None:
    path = tmp_path / "p.npz"
    mel = np.random.default_rng(0).standard_normal((10, 80)).astype(np.float32)
    emb = np.ones(192, dtype=np.float64)
    np.savez(path, tokens=np.arange(5, dtype=np.int32), mel=mel, embedding=emb)
    p = load_prompt_npz(path)
    assert p.tokens.tolist() == [0, 1, 2, 3, 4]
    assert p.mel.dtype == np.float32 and np.array_equal(p.mel, mel)
    assert p.embedding.dtype == np.float32 and p.embedding.shape == (192,)

    partial = tmp_path / "partial.npz"
    np.savez(partial, tokens=np.arange(5))
    with pytest.raises(ValueError, match="lacks array\\(s\\) mel, embedding"):
        load_prompt_npz(partial)
    with pytest.raises(FileNotFoundError):
        load_prompt_npz(tmp_path / "nope.npz")
