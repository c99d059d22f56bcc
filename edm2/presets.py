"""Training presets of the EDM2 paper as data (docs/design.md §5; paper Table 2 and App. D).

A preset names a dataset kind (`img512`: 64x64x4 Stable Diffusion latents of ImageNet-512; `img64`:
64x64x3 ImageNet-64 pixels) and a model size. `preset_network_kwargs` gives the Precond constructor
arguments, `preset_training_kwargs` the training hyperparameters.
"""

from __future__ import annotations

import copy
from typing import Any

Ki, Mi, Gi = 2**10, 2**20, 2**30

# Dataset kinds: what the network sees. 1000 ImageNet classes.
DATASETS: dict[str, dict[str, Any]] = {
    "img512": dict(img_resolution=64, img_channels=4, label_dim=1000),  # latents of 512x512 images
    "img64": dict(img_resolution=64, img_channels=3, label_dim=1000),  # pixels
}

# name: duration (images), batch, channels, lr (ref_lr), decay (t_ref in batches), dropout, P_mean, P_std
_TABLE = [
    ("edm2-img512-xxs", 2048 * Mi, 2048, 64, 0.0170, 70000, 0.00, -0.4, 1.0),
    ("edm2-img512-xs", 2048 * Mi, 2048, 128, 0.0120, 70000, 0.00, -0.4, 1.0),
    ("edm2-img512-s", 2048 * Mi, 2048, 192, 0.0100, 70000, 0.00, -0.4, 1.0),
    ("edm2-img512-m", 2048 * Mi, 2048, 256, 0.0090, 70000, 0.10, -0.4, 1.0),
    ("edm2-img512-l", 1792 * Mi, 2048, 320, 0.0080, 70000, 0.10, -0.4, 1.0),
    ("edm2-img512-xl", 1280 * Mi, 2048, 384, 0.0070, 70000, 0.10, -0.4, 1.0),
    ("edm2-img512-xxl", 896 * Mi, 2048, 448, 0.0065, 70000, 0.10, -0.4, 1.0),
    ("edm2-img64-xs", 1024 * Mi, 2048, 128, 0.0120, 35000, 0.00, -0.8, 1.6),
    ("edm2-img64-s", 1024 * Mi, 2048, 192, 0.0100, 35000, 0.00, -0.8, 1.6),
    ("edm2-img64-m", 2048 * Mi, 2048, 256, 0.0090, 35000, 0.10, -0.8, 1.6),
    ("edm2-img64-l", 1024 * Mi, 2048, 320, 0.0080, 35000, 0.10, -0.8, 1.6),
    ("edm2-img64-xl", 640 * Mi, 2048, 384, 0.0070, 35000, 0.10, -0.8, 1.6),
]
_FIELDS = ("duration", "batch", "channels", "lr", "decay", "dropout", "P_mean", "P_std")

PRESETS: dict[str, dict[str, Any]] = {row[0]: dict(zip(_FIELDS, row[1:])) for row in _TABLE}

# Paper Table 2 (ImageNet-512): parameters in millions and forward Gflops (one multiply-add = one op).
PAPER_PARAMS_M = {"xs": 125, "s": 280, "m": 498, "l": 777, "xl": 1119, "xxl": 1523}
PAPER_GFLOPS = {"xs": 46, "s": 102, "m": 181, "l": 282, "xl": 406, "xxl": 552}


# Not from the paper: a network small enough to train on a laptop CPU in minutes, on the built-in demo data
# (32x32 RGB, 10 classes). Same architecture, just narrow and shallow; its own learning-rate ramp-up.
DEMO_NETWORK = dict(
    img_resolution=32, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2, 2], num_blocks=1,
    attn_resolutions=[8], channels_per_head=32,
)
PRESETS["demo"] = dict(
    duration=32 * Ki, batch=64, channels=32, lr=0.0300, decay=2000, dropout=0.00, P_mean=-0.8, P_std=1.6
)
RAMPUP_IMG = {"demo": 4 * Ki}  # everything else: 10e6 images (not 10Mi), the official rampup_Mimg=10
# Images between status lines, EMA snapshots and checkpoints (docs/design.md §5 for the paper's presets).
REPORTING = {"demo": dict(status=4 * Ki, snapshot=8 * Ki, checkpoint=8 * Ki)}
DEFAULT_REPORTING = dict(status=128 * Ki, snapshot=8 * Mi, checkpoint=128 * Mi)


# The EDM2 paper's ablation ladder (Table 1, configurations A-G; docs/design.md "Ablation ladder"), at two sizes:
# 'xs' (ImageNet-512 latents, edm2-img512-xs's width and schedule) and 'demo' (the demo data, for tests and CPU runs).
# Per letter: ref_lr at xs, ref_lr at demo, inverse-square-root decay, EDM's sigma distribution (else the size's),
# learned loss weighting u(sigma), forced weight normalization, EDM's traditional EMA (else the power-function EMAs).
# A-D train at a constant learning rate (the decay comes with E); A-C have no weight normalization, so their learning
# rates are Adam's usual small ones.
ABLATION_CONFIGS = "abcdefg"
ABLATION_SIZES = {"xs": "edm2-img512-xs", "demo": "demo"}
_ABLATION = {
    "a": (1e-4, 1e-3, False, True, False, False, True),
    "b": (2e-4, 2e-3, False, False, True, False, True),
    "c": (2e-4, 2e-3, False, False, True, False, False),
    "d": (0.0120, 0.0300, False, False, True, False, False),
    "e": (0.0120, 0.0300, True, False, True, True, False),
    "f": (0.0120, 0.0300, True, False, True, True, False),
    "g": (0.0120, 0.0300, True, False, True, True, False),
}
EDM_SIGMA = dict(P_mean=-1.2, P_std=1.2)  # the EDM paper's training noise distribution (config A)
# EDM's traditional EMA as it trained ImageNet-64 (configs A-B; the EDM repository's README command for ImageNet,
# --duration=2500 --ema=50 in Mimg, and its training loop's default ema_rampup_ratio=0.05): a half-life of 50 Mimg
# over 2500 Mimg of training. The presets keep the ratio, a half-life of 2% of their duration (docs/design.md §13).
EDM_EMA_HALFLIFE_FRACTION = 50 / 2500
EDM_EMA_RAMPUP = 0.05
for _letter, (_lr_xs, _lr_demo, _decay, _edm_sigma, *_) in _ABLATION.items():
    for _size, _base in ABLATION_SIZES.items():
        PRESETS[f"ablation-{_letter}-{_size}"] = dict(
            PRESETS[_base], lr=_lr_xs if _size == "xs" else _lr_demo,
            decay=PRESETS[_base]["decay"] if _decay else 0, **(EDM_SIGMA if _edm_sigma else {}),
        )


def _base_preset(name: str) -> str:
    """The preset whose dataset, network size and reporting an ablation preset takes; the name itself otherwise."""
    return ABLATION_SIZES[name.split("-")[2]] if name.startswith("ablation-") else name


def get_preset(name: str) -> dict[str, Any]:
    """The training hyperparameters of a preset (a copy), e.g. get_preset('edm2-img512-s')['lr']."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_dataset(name: str) -> str:
    """'img512', 'img64' or 'demo' for a preset name."""
    get_preset(name)
    name = _base_preset(name)
    return "demo" if name == "demo" else name.split("-")[1]


def preset_network_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Precond constructor arguments for a preset; `overrides` replace or add arguments."""
    p = get_preset(name)
    base = copy.deepcopy(DEMO_NETWORK) if _base_preset(name) == "demo" else dict(DATASETS[preset_dataset(name)])
    kwargs = dict(base, model_channels=p["channels"], dropout=p["dropout"])
    letter = name.split("-")[1] if name.startswith("ablation-") else "g"
    if letter != "g":  # G is the reference network itself (arch 'edm2-unet')
        kwargs.update(arch="ablation", config=letter)
    kwargs.update(overrides)
    return kwargs


def preset_training_kwargs(name: str) -> dict[str, Any]:
    """Loss and optimizer settings of a preset, named as EDM2Loss and learning_rate_schedule take them."""
    p = get_preset(name)
    base = _base_preset(name)
    out = dict(
        duration=p["duration"],
        batch=p["batch"],
        loss=dict(P_mean=p["P_mean"], P_std=p["P_std"]),
        lr=dict(ref_lr=p["lr"], ref_batches=p["decay"], rampup_img=RAMPUP_IMG.get(base, 10_000_000)),
        **REPORTING.get(base, DEFAULT_REPORTING),
    )
    if name != base:  # an ablation preset: its training differences (TrainingConfig fields)
        _, _, _, _, learned, forced, traditional_ema = _ABLATION[name.split("-")[1]]
        out["loss"]["learned_weighting"] = learned
        out["force_weight_norm"] = forced
        if traditional_ema:
            out["ema_halflife"] = round(p["duration"] * EDM_EMA_HALFLIFE_FRACTION)
            out["ema_rampup"] = EDM_EMA_RAMPUP
    return out


# U-ViT backbones (arch='uvit', networks/uvit.py) sized for the demo data (32x32 RGB, 10 classes); not from a
# paper. They train with the demo preset's hyperparameters: `train_edm2.py --preset demo --arch uvit`.
# 'uvit-demo' has about the demo U-Net's parameter count (1.5M vs 1.2M); 'uvit-demo-xs' is for CPU tests.
UVIT_DEMO_NETWORKS: dict[str, dict[str, Any]] = {
    "uvit-demo": dict(
        img_resolution=32, img_channels=3, label_dim=10, arch="uvit", model_channels=128, depth=7, patch_size=2,
        mlp_ratio=4, channels_per_head=32,
    ),
    "uvit-demo-xs": dict(
        img_resolution=32, img_channels=3, label_dim=10, arch="uvit", model_channels=64, depth=5, patch_size=4,
        mlp_ratio=2, channels_per_head=32,
    ),
}


def uvit_network_kwargs(name: str = "uvit-demo", **overrides: Any) -> dict[str, Any]:
    """Precond constructor arguments of a U-ViT demo size; `overrides` replace or add arguments."""
    if name not in UVIT_DEMO_NETWORKS:
        raise ValueError(f"unknown U-ViT size {name!r}; expected one of: {', '.join(UVIT_DEMO_NETWORKS)}")
    return dict(copy.deepcopy(UVIT_DEMO_NETWORKS[name]), **overrides)
