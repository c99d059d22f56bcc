"""edm2: the public API shared by the scripts and by users.

    import edm2
    net = edm2.Precond(**edm2.preset_network_kwargs('edm2-img512-s'))
    loss = edm2.EDM2Loss(P_mean=-0.4, P_std=1.0)(net, images, labels)
"""

from networks import (
    MPConv,
    MPFourier,
    Precond,
    UNet,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    pixel_norm,
)
from torch_utils import VERSION
from training import EDM2Loss, learning_rate_schedule, reduce_batch_loss

from networks import SKIP_SCALING_MODES, SkipScaling, UViT
from training.instruments import SkipInstruments
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder, encoder_from_config
from training.phema import PowerFunctionEMA, TraditionalEMA

from . import detectors, metrics, phema
from .metrics import (
    FeatureStatistics,
    calc_metrics_for_images,
    calc_metrics_for_model,
    frechet_distance,
    load_reference,
    save_reference,
)
from .download import DownloadError, download, resolve_path_or_url
from .model_files import ModelFileError, NetworkFile, load_network, read_header, register_network_class, save_network
from .official import OFFICIAL_PRESETS, resolve_official_preset
from .official_pickle import UnsafePickleError
from .generation import (
    GenerationSummary, generate_batch, generate_images, load_for_sampling, make_grid, prepare_for_sampling,
    sampling_plan, save_png,
)
from .sampler import SamplerStats, count_evaluations, edm_sampler, edm_settings, evaluation_sigmas, step_sigmas
from . import guidance, schedules, solvers
from .guidance import GuidedDenoiser, NetworkDenoiser
from .solvers import SOLVERS, sample, seed_noise
from .sampling import SamplingSettings, sampling_settings
from .seeds import SeedGenerators, format_seeds, parse_seeds, seed_noise_and_labels
from .presets import UVIT_DEMO_NETWORKS, uvit_network_kwargs
from .presets import (
    DATASETS,
    PRESETS,
    get_preset,
    preset_dataset,
    preset_network_kwargs,
    preset_training_kwargs,
)

__version__ = VERSION

__all__ = [
    "SKIP_SCALING_MODES", "SkipInstruments", "SkipScaling", "UVIT_DEMO_NETWORKS", "UViT", "uvit_network_kwargs",
    "FeatureStatistics", "calc_metrics_for_images", "calc_metrics_for_model", "detectors", "frechet_distance",
    "load_reference", "metrics", "save_reference",
    "GenerationSummary", "PowerFunctionEMA", "SamplerStats", "SeedGenerators", "StabilityVAEEncoder",
    "StandardRGBEncoder", "TraditionalEMA", "count_evaluations", "edm_sampler", "edm_settings", "encoder_from_config",
    "evaluation_sigmas", "format_seeds", "generate_batch", "generate_images", "load_for_sampling", "make_grid",
    "parse_seeds",
    "prepare_for_sampling", "sampling_plan",
    "save_png", "seed_noise_and_labels", "step_sigmas",
    "GuidedDenoiser", "NetworkDenoiser", "SOLVERS", "guidance", "sample", "schedules", "seed_noise", "solvers",
    "SamplingSettings", "sampling_settings",
    "DownloadError", "ModelFileError", "NetworkFile", "OFFICIAL_PRESETS", "UnsafePickleError", "download",
    "load_network", "phema", "read_header", "register_network_class", "resolve_official_preset",
    "resolve_path_or_url", "save_network",
    "DATASETS", "EDM2Loss", "MPConv", "MPFourier", "PRESETS", "Precond", "UNet", "__version__",
    "get_preset", "learning_rate_schedule", "mp_cat", "mp_silu", "mp_sum", "normalize", "pixel_norm",
    "preset_dataset", "preset_network_kwargs", "preset_training_kwargs", "reduce_batch_loss",
]
