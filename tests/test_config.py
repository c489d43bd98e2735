from __future__ import annotations

from pathlib import Path

import pytest

import token2wav
from token2wav.config import ConfigError, ModuleSpec, read_config

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    ("name", "family", "vocab", "chunk", "flow_class"),
    [
        ("cv3_config.yaml", "cosyvoice3", 512, 50, "CausalMaskedDiffWithDiT"),
        ("cv2_config.yaml", "cosyvoice2", 64, 50, "CausalMaskedDiffWithXvec"),
        ("real_configs/cosyvoice3.yaml", "cosyvoice3", 6561, 50, "CausalMaskedDiffWithDiT"),
        ("real_configs/cosyvoice2.yaml", "cosyvoice2", 6561, 50, "CausalMaskedDiffWithXvec"),
    ],
)
def test_reads_reference_configs(name, family, vocab, chunk, flow_class):
    cfg = token2wav.read_config(DATA / name)
    assert cfg.family == family
    assert cfg.vocab_size == vocab
    assert cfg.static_chunk_size == chunk  # `!ref <chunk_size> * <token_mel_ratio>` = 25 * 2
    assert cfg.chunk_tokens == 25
    assert cfg.token_mel_ratio == 2
    assert cfg.pre_lookahead_len == 3
    assert cfg.num_decoding_left_chunks == -1
    assert cfg.sample_rate == 24000 and cfg.token_rate == 25
    assert cfg.samples_per_frame == 480  # 8 * 5 * 3 upsampling times the iSTFT hop of 4
    assert cfg.spk_embed_dim == 192
    assert cfg.flow.target.endswith(flow_class)
    cfm = cfg.flow.get("decoder")
    assert isinstance(cfm, ModuleSpec)
    # omegaconf.DictConfig content is plain data, and 1e-06 is a number (YAML 1.2), not a string.
    assert cfm.get("cfm_params") == {
        "sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine",
        "training_cfg_rate": 0.2, "inference_cfg_rate": 0.7, "reg_loss_type": "l1",
    }
    assert cfg.mel is not None and cfg.mel.n_fft == 1920 and cfg.mel.hop == 480


def test_real_cv2_feat_extractor_fmax():
    assert read_config(DATA / "real_configs/cosyvoice2.yaml").mel.fmax == 8000.0
    assert read_config(DATA / "real_configs/cosyvoice3.yaml").mel.fmax is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cosyvoice3.yaml"
    path.write_text(text)
    return path


BASE = (DATA / "cv3_config.yaml").read_text()


def test_code_executing_tag_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    text = BASE.replace(
        "# fixed params", f"evil: !apply:os.system ['touch {marker}']\n# fixed params"
    )
    with pytest.raises(ConfigError, match=r"line \d+: tag '!apply:os.system' would execute code"):
        read_config(_write(tmp_path, text))
    assert not marker.exists()


def test_python_object_tag_is_refused(tmp_path):
    text = BASE + "\nboom: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(ConfigError):
        read_config(_write(tmp_path, text))


def test_unknown_class_in_flow_is_refused_with_line(tmp_path):
    text = BASE.replace("cosyvoice.flow.DiT.dit.DiT", "evil.module.Thing")
    with pytest.raises(ConfigError, match=r"line \d+: tag '!new:evil.module.Thing' in 'flow': unknown class"):
        read_config(_write(tmp_path, text))


def test_unknown_tag_is_refused(tmp_path):
    text = BASE.replace("output_type: 'mel'", "output_type: !include other.yaml")
    with pytest.raises(ConfigError, match=r"line \d+: unsupported YAML tag '!include'"):
        read_config(_write(tmp_path, text))


def test_undefined_ref(tmp_path):
    text = BASE.replace("!ref <chunk_size> * <token_mel_ratio>", "!ref <no_such_thing> * 2")
    with pytest.raises(ConfigError, match="undefined name '<no_such_thing>'"):
        read_config(_write(tmp_path, text))


def test_ref_arithmetic_is_only_arithmetic(tmp_path):
    text = BASE.replace("!ref <chunk_size> * <token_mel_ratio>", "!ref __import__('os')")
    with pytest.raises(ConfigError, match="not plain arithmetic"):
        read_config(_write(tmp_path, text))
    text = BASE.replace("!ref <chunk_size> * <token_mel_ratio>", "!ref (<chunk_size> + 5) * <token_mel_ratio> - 10")
    assert read_config(_write(tmp_path, text)).static_chunk_size == 50


def test_chunk_not_multiple_of_ratio_names_valid_values(tmp_path):
    text = BASE.replace("!ref <chunk_size> * <token_mel_ratio>", "25")
    with pytest.raises(ConfigError, match=r"static_chunk_size \(25 mel frames\).*nearby valid values: \[24, 26\]"):
        read_config(_write(tmp_path, text))


def test_skips_sections_it_does_not_need():
    # The real configs name LLM, data pipeline and GAN classes we do not implement; reading must not touch them.
    cfg = read_config(DATA / "real_configs/cosyvoice2.yaml")
    assert cfg.flow.get("encoder").target.endswith("UpsampleConformerEncoder")


def test_model_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config file found"):
        read_config(tmp_path)
