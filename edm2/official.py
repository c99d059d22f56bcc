"""The official pre-trained model presets of the EDM2 and autoguidance papers, as data.

Each preset is dict(net=URL, gnet=URL or None, guidance=float): the main network, the guiding network
(classifier-free guidance: an unconditional XS model; autoguidance: a smaller, shorter-trained model) and the
guidance weight w of D = D_g + w (D_main - D_g) (docs/design.md §7). The files are the official post-hoc EMA
reconstructions; file names read <preset>-<training kimg>-<EMA std>.pkl. They are official pickles, which
`edm2.load_network` reads without running their code. The comment on each line is the published result
(50k images, the paper's sampler settings): FID for '-fid' presets, FD_DINOv2 for '-dino' presets.

Source of the names, URLs, guidance weights and results: the official repository's README and the preset
table of its image generation script (github.com/NVlabs/edm2). The URLs have not been fetched from here.
"""

from __future__ import annotations

import copy
from typing import Any

OFFICIAL_MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
OFFICIAL_RAW_SNAPSHOTS = "https://nvlabs-fi-cdn.nvidia.com/edm2/raw-snapshots"  # <preset>/network-snapshot-*.pkl
OFFICIAL_DATASET_REFS = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs"  # img512.pkl, img64.pkl (metrics)


def _preset(net: str, gnet: str | None = None, guidance: float = 1.0) -> dict[str, Any]:
    return dict(
        net=f"{OFFICIAL_MODEL_ROOT}/{net}.pkl",
        gnet=f"{OFFICIAL_MODEL_ROOT}/{gnet}.pkl" if gnet is not None else None,
        guidance=guidance,
    )


UNCOND_XS = "edm2-img512-xs-uncond-2147483"  # the guiding network of every classifier-free guidance preset

OFFICIAL_PRESETS: dict[str, dict[str, Any]] = {
    # EDM2 paper, Table 2: ImageNet-512, no guidance, EMA length chosen for FID.
    "edm2-img512-xs-fid": _preset("edm2-img512-xs-2147483-0.135"),  # FID 3.53
    "edm2-img512-s-fid": _preset("edm2-img512-s-2147483-0.130"),  # FID 2.56
    "edm2-img512-m-fid": _preset("edm2-img512-m-2147483-0.100"),  # FID 2.25
    "edm2-img512-l-fid": _preset("edm2-img512-l-1879048-0.085"),  # FID 2.06
    "edm2-img512-xl-fid": _preset("edm2-img512-xl-1342177-0.085"),  # FID 1.96
    "edm2-img512-xxl-fid": _preset("edm2-img512-xxl-0939524-0.070"),  # FID 1.91
    # EDM2 paper, Table 5: ImageNet-512, no guidance, EMA length chosen for FD_DINOv2.
    "edm2-img512-xs-dino": _preset("edm2-img512-xs-2147483-0.200"),  # FD_DINOv2 103.39
    "edm2-img512-s-dino": _preset("edm2-img512-s-2147483-0.190"),  # FD_DINOv2 68.64
    "edm2-img512-m-dino": _preset("edm2-img512-m-2147483-0.155"),  # FD_DINOv2 58.44
    "edm2-img512-l-dino": _preset("edm2-img512-l-1879048-0.155"),  # FD_DINOv2 52.25
    "edm2-img512-xl-dino": _preset("edm2-img512-xl-1342177-0.155"),  # FD_DINOv2 45.96
    "edm2-img512-xxl-dino": _preset("edm2-img512-xxl-0939524-0.150"),  # FD_DINOv2 42.84
    # EDM2 paper, Table 3: ImageNet-64 (pixels), no guidance, FID.
    "edm2-img64-s-fid": _preset("edm2-img64-s-1073741-0.075"),  # FID 1.58
    "edm2-img64-m-fid": _preset("edm2-img64-m-2147483-0.060"),  # FID 1.43
    "edm2-img64-l-fid": _preset("edm2-img64-l-1073741-0.040"),  # FID 1.33
    "edm2-img64-xl-fid": _preset("edm2-img64-xl-0671088-0.040"),  # FID 1.33
    # EDM2 paper, Table 2: ImageNet-512 with classifier-free guidance (unconditional XS guiding network).
    "edm2-img512-xs-guid-fid": _preset("edm2-img512-xs-2147483-0.045", f"{UNCOND_XS}-0.045", 1.4),  # FID 2.91
    "edm2-img512-s-guid-fid": _preset("edm2-img512-s-2147483-0.025", f"{UNCOND_XS}-0.025", 1.4),  # FID 2.23
    "edm2-img512-m-guid-fid": _preset("edm2-img512-m-2147483-0.030", f"{UNCOND_XS}-0.030", 1.2),  # FID 2.01
    "edm2-img512-l-guid-fid": _preset("edm2-img512-l-1879048-0.015", f"{UNCOND_XS}-0.015", 1.2),  # FID 1.88
    "edm2-img512-xl-guid-fid": _preset("edm2-img512-xl-1342177-0.020", f"{UNCOND_XS}-0.020", 1.2),  # FID 1.85
    "edm2-img512-xxl-guid-fid": _preset("edm2-img512-xxl-0939524-0.015", f"{UNCOND_XS}-0.015", 1.2),  # FID 1.81
    "edm2-img512-xs-guid-dino": _preset("edm2-img512-xs-2147483-0.150", f"{UNCOND_XS}-0.150", 1.7),  # FD_DINOv2 79.94
    "edm2-img512-s-guid-dino": _preset("edm2-img512-s-2147483-0.085", f"{UNCOND_XS}-0.085", 1.9),  # FD_DINOv2 52.32
    "edm2-img512-m-guid-dino": _preset("edm2-img512-m-2147483-0.015", f"{UNCOND_XS}-0.015", 2.0),  # FD_DINOv2 41.98
    "edm2-img512-l-guid-dino": _preset("edm2-img512-l-1879048-0.035", f"{UNCOND_XS}-0.035", 1.7),  # FD_DINOv2 38.20
    "edm2-img512-xl-guid-dino": _preset("edm2-img512-xl-1342177-0.030", f"{UNCOND_XS}-0.030", 1.7),  # FD_DINOv2 35.67
    "edm2-img512-xxl-guid-dino": _preset("edm2-img512-xxl-0939524-0.015", f"{UNCOND_XS}-0.015", 1.7),  # FD_DINOv2 33.09
    # Autoguidance paper, Table 1: conditional ImageNet-512, guided by a smaller, shorter-trained model.
    "edm2-img512-s-autog-fid": _preset("edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125", 2.10),  # FID 1.34
    "edm2-img512-s-autog-dino": _preset(
        "edm2-img512-s-2147483-0.120", "edm2-img512-xs-0134217-0.165", 2.45
    ),  # FD_DINOv2 36.67
    "edm2-img512-xxl-autog-fid": _preset(
        "edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", 2.05
    ),  # FID 1.25
    "edm2-img512-xxl-autog-dino": _preset(
        "edm2-img512-xxl-0939524-0.130", "edm2-img512-m-0268435-0.205", 2.30
    ),  # FD_DINOv2 24.18
    # Autoguidance paper, Table 1: unconditional ImageNet-512.
    "edm2-img512-s-uncond-autog-fid": _preset(
        "edm2-img512-s-uncond-2147483-0.070", "edm2-img512-xs-uncond-0134217-0.110", 2.85
    ),  # FID 3.86
    "edm2-img512-s-uncond-autog-dino": _preset(
        "edm2-img512-s-uncond-2147483-0.090", "edm2-img512-xs-uncond-0134217-0.125", 2.90
    ),  # FD_DINOv2 90.39
    # Autoguidance paper, Table 1: conditional ImageNet-64.
    "edm2-img64-s-autog-fid": _preset("edm2-img64-s-1073741-0.045", "edm2-img64-xs-0134217-0.110", 1.70),  # FID 1.01
    "edm2-img64-s-autog-dino": _preset(
        "edm2-img64-s-1073741-0.105", "edm2-img64-xs-0134217-0.175", 2.20
    ),  # FD_DINOv2 31.85
}


def resolve_official_preset(name: str) -> dict[str, Any]:
    """dict(net=URL, gnet=URL or None, guidance=float) of an official preset (a copy)."""
    if name not in OFFICIAL_PRESETS:
        raise ValueError(f"unknown official preset {name!r}; known presets: {', '.join(OFFICIAL_PRESETS)}")
    return copy.deepcopy(OFFICIAL_PRESETS[name])
