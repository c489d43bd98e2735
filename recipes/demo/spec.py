"""The demo voice's architecture as data (the `flow` / `vocoder` entries of token2wav.yaml) and a builder.

The same dict is written into the shipped token2wav.yaml, so what was trained is what gets loaded.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

SAMPLE_RATE = 22050
HOP = 256
TOKEN_MEL_RATIO = 2
VOCAB = 2048
SPK_EMBED_DIM = 192
PRE_LOOKAHEAD = 5  # the layer's reach; run-time lookahead may be anything in 0..5
DEFAULT_LOOKAHEAD = 3
DEFAULT_CHUNK_FRAMES = 50  # 25 tokens
CHUNK_TOKENS_RANGE = (12, 50)

_CLASSES = {
    "CausalMaskedDiffWithDiT": "token2wav.models.flow:CausalMaskedDiffWithDiT",
    "PreLookaheadLayer": "token2wav.models.lookahead:PreLookaheadLayer",
    "CausalConditionalCFM": "token2wav.models.cfm:CausalConditionalCFM",
    "DiT": "token2wav.models.dit:DiT",
    "HiFiGANGenerator": "token2wav.models.hifigan:HiFiGANGenerator",
}


def flow_spec(
    dim: int = 256, depth: int = 4, heads: int = 4, dim_head: int = 64, ff_mult: int = 2, lookahead_channels: int = 256
) -> dict[str, Any]:
    return {
        "class": "CausalMaskedDiffWithDiT",
        "kwargs": {
            "input_size": 80,
            "output_size": 80,
            "spk_embed_dim": SPK_EMBED_DIM,
            "output_type": "mel",
            "vocab_size": VOCAB,
            "input_frame_rate": round(SAMPLE_RATE / HOP / TOKEN_MEL_RATIO),
            "only_mask_loss": True,
            "token_mel_ratio": TOKEN_MEL_RATIO,
            "pre_lookahead_len": PRE_LOOKAHEAD,
            "pre_lookahead_layer": {
                "class": "PreLookaheadLayer",
                "kwargs": {"in_channels": 80, "channels": lookahead_channels, "pre_lookahead_len": PRE_LOOKAHEAD},
            },
            "decoder": {
                "class": "CausalConditionalCFM",
                "kwargs": {
                    "in_channels": 240,
                    "n_spks": 1,
                    "spk_emb_dim": 80,
                    "cfm_params": {
                        "sigma_min": 1e-06,
                        "solver": "euler",
                        "t_scheduler": "cosine",
                        "training_cfg_rate": 0.2,
                        "inference_cfg_rate": 0.7,
                        "reg_loss_type": "l1",
                    },
                    "estimator": {
                        "class": "DiT",
                        "kwargs": {
                            "dim": dim,
                            "depth": depth,
                            "heads": heads,
                            "dim_head": dim_head,
                            "ff_mult": ff_mult,
                            "mel_dim": 80,
                            "mu_dim": 80,
                            "spk_dim": 80,
                            "out_channels": 80,
                            "static_chunk_size": DEFAULT_CHUNK_FRAMES,
                            "num_decoding_left_chunks": -1,
                            "dropout": 0.0,
                        },
                    },
                },
            },
        },
    }


def vocoder_spec() -> dict[str, Any]:
    return {
        "class": "HiFiGANGenerator",
        "kwargs": {
            "in_channels": 80,
            "upsample_rates": [8, 8, 2, 2],
            "upsample_kernel_sizes": [16, 16, 4, 4],
            "upsample_initial_channel": 512,
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "resblock": "1",
            "sampling_rate": SAMPLE_RATE,
        },
    }


def build(spec: dict[str, Any]) -> Any:
    """Instantiate a {class, kwargs} tree with our classes (nested modules first)."""

    def value(v: Any) -> Any:
        if isinstance(v, dict) and "class" in v:
            return build(v)
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [value(x) for x in v]
        return v

    module_name, _, attr = _CLASSES[spec["class"]].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return cls(**{k: value(v) for k, v in copy.deepcopy(spec.get("kwargs", {})).items()})
