"""Feature detectors of the metrics (docs/design.md §8), written for this project:

- `fid`: Inception-v3 of the 2015-12-05 TF graph (2048-d pool features), `InceptionV3FID`;
- `fd_dinov2`: DINOv2 ViT-L/14 (1024-d class token), `DINOv2ViT`.

    detector = edm2.detectors.load_detector('fid')            # weights: option, env var, or download cache
    features = detector(images_uint8)                           # [N, 3, H, W] uint8 -> [N, 2048] float32
"""

from .dinov2 import DINOv2ViT
from .inception import InceptionV3FID, tf_legacy_bilinear_resize
from .loading import (
    DETECTORS,
    METRICS,
    DetectorSpec,
    DetectorWeightsError,
    build_detector,
    check_state_dict,
    get_spec,
    load_detector,
    read_weights,
    resolve_weights,
    save_detector,
)

__all__ = [
    "DETECTORS",
    "METRICS",
    "DINOv2ViT",
    "DetectorSpec",
    "DetectorWeightsError",
    "InceptionV3FID",
    "build_detector",
    "check_state_dict",
    "get_spec",
    "load_detector",
    "read_weights",
    "resolve_weights",
    "save_detector",
    "tf_legacy_bilinear_resize",
]
