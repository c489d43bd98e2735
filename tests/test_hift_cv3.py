"""CosyVoice 3 causal HiFT vocoder against the reference fixtures (tests/data/cv3_hift.*)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import max_abs_diff
from safetensors.torch import load_file
from tolerances import NETWORK
from torch.nn.utils import parametrize

import token2wav
from token2wav import build_vocoder
from token2wav.models.hift import CausalHiFTGenerator, reference_noise_offset

DATA = Path(__file__).parent / "data"
NOISE_SEED = 7000  # the fixtures' re-drawn fixed noise (see FIXTURES.md)
# F0 in float64 (as the reference): a float64 conv-RNN on F0 up to ~300 Hz rounds by ~1e-13 Hz (measured 3.4e-13);
# FIXTURES.md suggests 1e-8 Hz
F0_TOL = 1e-8
# Speech and source: F0 and the phase are float64, so only float32 sines, the source's linear layer and the
# decoder's float32 pass re-associate: NETWORK (FIXTURES.md suggests 1e-5; float64 decode 9.2e-8 at |speech| 0.07)
TOL = NETWORK


def _load() -> CausalHiFTGenerator:
    model = build_vocoder(DATA / "cv3_config.yaml", device="cpu")
    state = {k: v.float() for k, v in load_file(DATA / "cv3_hift_state.safetensors").items()}
    model.load_state_dict(state, strict=True)
    model.set_source_noise(NOISE_SEED)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def hift() -> CausalHiFTGenerator:
    model = _load()
    assert isinstance(model, CausalHiFTGenerator)
    return model


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(DATA / "cv3_hift.safetensors")




def test_seeded_noise_check_values(hift, fx):
    # seeded uniform draws (torch.rand: the generator's integers, scaled) are exact on every kernel
    assert torch.equal(hift.source_rand_ini, fx["causal_noise_rand_ini"])
    assert torch.equal(hift.source_noise(0, 1920), fx["causal_noise_sine_waves_head"])
    assert torch.equal(hift.source_noise(0, 1920, "uv"), fx["causal_noise_uv_head"])
    # read in pieces and out of order: rows depend on the position only
    assert torch.equal(hift.source_noise(1000, 1920), fx["causal_noise_sine_waves_head"][:, 1000:])


def test_noise_far_positions_match_one_big_draw():
    model = CausalHiFTGenerator(base_channels=8, sampling_rate=24000, upsample_rates=[8, 5, 3],
                                upsample_kernel_sizes=[16, 11, 7], source_resblock_kernel_sizes=[7, 7, 11],
                                source_resblock_dilation_sizes=[[1, 3, 5]] * 3)
    model.set_source_noise(5, length=40000)
    full = torch.rand(1, 40000, 9, generator=torch.Generator().manual_seed(6))  # seeded uniform: exact anywhere
    assert torch.equal(model.source_noise(33000, 40000), full[:, 33000:])
    assert torch.equal(model.source_noise(16000, 17000), full[:, 16000:17000])
    with pytest.raises(ValueError, match="covers 40000"):
        model.source_noise(39000, 40001)


def test_reference_real_config_noise():
    """The default noise equals what the reference draws with the released CosyVoice 3 config."""
    info = json.loads((DATA / "manifests" / "cosyvoice3_hift.json").read_text())["hyperparameters"]
    noise = info["fixed_noise_as_built_from_this_config"]
    model = build_vocoder(DATA / "real_configs" / "cosyvoice3.yaml", device="meta")
    # the default offset is the real config's: flow embedding + speaker projection + F0 predictor draws
    assert reference_noise_offset(6561, 80, 192, 80, model.f0_predictor) == 3_852_961
    small = build_vocoder(DATA / "cv3_config.yaml", device="cpu")  # cheap host for the same default noise
    # seeded uniform draws, exact on every kernel; a float32 value survives the JSON round trip
    assert small.source_rand_ini[0].tolist() == noise["rand_ini"]
    assert small.source_noise(0, 1)[0, 0].tolist() == noise["sine_waves_first_row"]
    assert small.source_noise(0, 5, "uv")[0, :, 0].tolist() == noise["uv_first5"]


def test_f0_float64(hift, fx):
    mel = fx["mel"]
    with torch.inference_mode():
        f0 = hift.f0_predictor(mel.double())
        f0_nf = hift.f0_predictor(mel.double(), finalize=False)
    assert f0.dtype == torch.float64
    assert max_abs_diff(f0, fx["f0_finalize"]) < F0_TOL
    assert max_abs_diff(f0_nf, fx["f0_nofinalize"]) < F0_TOL
    assert all(p.dtype == torch.float32 for p in hift.parameters())  # never cast permanently


def test_inference_finalize(hift, fx):
    speech, source = hift.inference(fx["mel"], finalize=True)
    assert max_abs_diff(speech, fx["speech_finalize"]) < TOL
    assert max_abs_diff(source, fx["source_finalize"]) < TOL
    assert all(p.dtype == torch.float32 for p in hift.parameters())


def test_inference_no_finalize(hift, fx):
    speech, source = hift.inference(fx["mel"], finalize=False)
    assert speech.shape[-1] == (60 - 8) * 480
    assert source.shape[-1] == (60 - 3) * 480
    assert max_abs_diff(speech, fx["speech_nofinalize"]) < TOL
    assert max_abs_diff(source, fx["source_finalize"][..., : source.shape[-1]]) < TOL


def test_reference_prefix_streaming_loop(hift, fx):
    mel = fx["stream_mel"]
    for k, i in enumerate(range(0, 90, 30)):
        end = i + 30 + 8
        speech = hift.inference(mel[:, :, :end], finalize=end >= 90)[0][:, 480 * i:]
        assert max_abs_diff(speech, fx[f"stream_step{k}"]) < TOL, k


def test_loader_fold_keeps_float64_f0(fx):
    model = token2wav.load_vocoder(DATA / "cv3_config.yaml", DATA / "cv3_hift_state.safetensors")
    model.set_source_noise(NOISE_SEED)
    assert parametrize.is_parametrized(model.f0_predictor.condnet[0], "weight")  # kept on purpose
    assert not parametrize.is_parametrized(model.conv_pre, "weight")
    with torch.inference_mode():
        assert max_abs_diff(model.f0_predictor(fx["mel"].double()), fx["f0_finalize"]) < F0_TOL
    assert max_abs_diff(model.inference(fx["mel"])[0], fx["speech_finalize"]) < TOL


def test_bad_inputs(hift):
    with pytest.raises(ValueError, match="rank 3"):
        hift.inference(torch.zeros(80, 10))
    with pytest.raises(ValueError, match="80 mel channels"):
        hift.inference(torch.zeros(1, 40, 10))
    with pytest.raises(ValueError, match="seed|length"):
        hift.set_source_noise(1, length=-1)


def test_full_size_layout_matches_manifest():
    manifest = json.loads((DATA / "manifests" / "cosyvoice3_hift.json").read_text())
    model = build_vocoder(DATA / "real_configs" / "cosyvoice3.yaml", device="meta")
    state = model.state_dict()
    assert sorted(state) == sorted(manifest["keys"])
    for key, info in manifest["keys"].items():
        assert list(state[key].shape) == info["shape"], key
    assert sum(t.numel() for t in state.values()) == manifest["num_parameters"]


def test_snake_keeps_its_alpha_terms_only_while_alpha_is_unchanged():
    """Snake keeps ``a`` and ``1 / (a + 1e-9)`` between calls without autograd; a changed alpha (a loaded
    checkpoint, an in-place edit) is seen on the next call, and with autograd the gradient reaches alpha."""
    from token2wav.models.hift import Snake

    snake = Snake(4, alpha_logscale=True)
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2))

    def formula() -> torch.Tensor:
        a = snake.alpha.detach().exp().view(1, -1, 1)
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a) ** 2

    with torch.inference_mode():
        first = snake(x)
    assert torch.equal(first, formula())
    with torch.no_grad():
        snake.alpha.add_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    with torch.inference_mode():
        second = snake(x)
    assert torch.equal(second, formula()) and not torch.equal(second, first)
    snake(x).sum().backward()
    assert snake.alpha.grad is not None and bool(snake.alpha.grad.abs().sum() > 0)
