"""training/config.py: the typed training configuration, its JSON form, its checks, the fields a resume may change,
and the one place that says which images and which noise each process takes of a step's batch."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from training.config import LEGACY_KEYS, RESUMABLE_CHANGES, LrConfig, TrainingConfig, TrainingError
from training.dataset import InfiniteSampler, batch_chunk

# training_options.json as the code before TrainingConfig wrote it: every key, the removed speed switches included.
LEGACY_OPTIONS = {
    "data": "/data/demo-data.zip", "cond": True, "xflip": False, "encoder": {"class": "standard_rgb"},
    "network": {"model_channels": 32, "channel_mult": [1, 2], "dropout": 0.1, "precision": "fp16"},
    "loss": {"P_mean": -0.8, "P_std": 1.6, "sigma_data": 0.5},
    "lr": {"ref_lr": 0.012, "ref_batches": 70000.0, "rampup_img": 10000000},
    "betas": [0.9, 0.99], "eps": 1e-08, "duration": 2097152, "batch": 256, "batch_gpu": 128,
    "ema_stds": [0.05, 0.1], "status": 131072, "snapshot": 1048576, "checkpoint": 4194304, "seed": 0, "workers": 2,
    "compile": True, "channels_last": None, "instruments": None, "fused_step": None, "batched_weights": True,
    "fast_dropout": None, "cudnn_benchmark": True, "ddp_overlap": False, "grad_sync": "grouped",
    "max_nonfinite_status": 3,
    "data_identity": {"num_files": 40, "num_bytes": 12345, "index_sha256": "ab" * 32},
}


def test_round_trip_keeps_every_value(tmp_path):
    config = TrainingConfig(
        data="d.zip", network=dict(model_channels=8, precision="bf16"), lr=LrConfig(ref_lr=0.02, ref_batches=0),
        batch=64, batch_gpu=16, kernels="reference", grad_sync="flat", instruments=False, compile=True,
    )
    path = str(tmp_path / "training_options.json")
    config.to_json(path)
    assert TrainingConfig.from_json(path) == config
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_options.json"]  # no temp file left
    # The keys of the file are today's: nested loss and lr objects, no data_identity until the loop records it.
    keys = json.load(open(path))
    assert keys["lr"] == dict(ref_lr=0.02, ref_batches=0, rampup_img=10_000_000) and "data_identity" not in keys
    assert not set(LEGACY_KEYS) & set(keys)


def test_traditional_ema_keys_only_when_set(tmp_path):
    """The traditional EMA's settings (ablation configs A-B) are written only when set: other runs' files keep their
    keys; set, they round-trip and a resume with another EMA is refused."""
    from training.run_dir import config_differences

    default = TrainingConfig(data="d.zip").to_dict()
    assert "ema_halflife" not in default and "ema_rampup" not in default
    config = TrainingConfig(data="d.zip", ema_halflife=655, ema_rampup=0.05)
    path = str(tmp_path / "training_options.json")
    config.to_json(path)
    written = json.load(open(path))
    assert written["ema_halflife"] == 655 and written["ema_rampup"] == 0.05
    assert set(written) == set(default) | {"ema_halflife", "ema_rampup"}
    assert TrainingConfig.from_json(path) == config and config.validate().ema_halflife == 655
    no_ramp = TrainingConfig(data="d.zip", ema_halflife=655).to_dict()
    assert no_ramp["ema_halflife"] == 655 and "ema_rampup" not in no_ramp
    assert TrainingConfig.from_dict(no_ramp).ema_rampup is None
    differ = config_differences(default, written)
    assert differ == ["ema_halflife: None there, 655 now", "ema_rampup: None there, 0.05 now"]
    assert not {"ema_halflife", "ema_rampup"} & set(RESUMABLE_CHANGES)


def test_legacy_options_file_loads_without_the_removed_speed_keys(tmp_path):
    path = tmp_path / "training_options.json"
    path.write_text(json.dumps(LEGACY_OPTIONS, indent=2))
    config = TrainingConfig.from_json(str(path))
    assert config.grad_sync is None  # 'grouped' (and 'overlap') are gone: the default takes over
    assert config.kernels is None and config.compile is True
    assert config.lr.ref_lr == 0.012 and config.loss.P_mean == -0.8 and config.network["dropout"] == 0.1
    assert config.data_identity == LEGACY_OPTIONS["data_identity"]
    expected = {k: v for k, v in LEGACY_OPTIONS.items() if k not in LEGACY_KEYS}
    assert config.to_dict() == dict(expected, grad_sync=None, kernels=None)
    # An old file with grad_sync 'overlap' loads the same way.
    assert TrainingConfig.from_dict(dict(LEGACY_OPTIONS, grad_sync="overlap")).grad_sync is None


@pytest.mark.parametrize("change,message", [
    (dict(fused_steps=True), "unknown key 'fused_steps'"),
    (dict(lr=dict(LEGACY_OPTIONS["lr"], ref_rl=0.1)), "unknown key 'lr.ref_rl'"),
    (dict(batch="256"), "key 'batch' must be an integer, got '256'"),
    (dict(batch=256.0), "key 'batch' must be an integer, got 256.0"),
    (dict(compile=1), "key 'compile' must be true or false or null, got 1"),
    (dict(batch_gpu="x"), "key 'batch_gpu' must be an integer or null, got 'x'"),
    (dict(loss=dict(P_mean="low")), "key 'loss.P_mean' must be a number, got 'low'"),
    (dict(loss=[1]), "key 'loss' must be an object, got list"),
    (dict(ema_stds=[0.05, "x"]), "key 'ema_stds' must be a list of numbers"),
    (dict(network=[]), "key 'network' must be an object, got []"),
    (dict(ema_halflife="655"), "key 'ema_halflife' must be a number or null, got '655'"),
])
def test_unknown_key_or_wrong_type_names_file_and_key(tmp_path, change, message):
    path = tmp_path / "training_options.json"
    path.write_text(json.dumps(dict(LEGACY_OPTIONS, **change)))
    with pytest.raises(TrainingError) as e:
        TrainingConfig.from_json(str(path))
    text = str(e.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_unreadable_options_file_is_named(tmp_path):
    path = tmp_path / "training_options.json"
    path.write_text("{not json")
    with pytest.raises(TrainingError, match=r"training_options\.json: unreadable"):
        TrainingConfig.from_json(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(TrainingError, match=r"training_options\.json: the configuration must be an object"):
        TrainingConfig.from_json(str(path))


@pytest.mark.parametrize("change,message", [
    (dict(batch=0), "--batch must be a positive number of images, got 0"),
    (dict(duration=-1), "--duration must be a positive number of images, got -1"),
    (dict(batch=10, batch_gpu=4), "--batch 10 must be divisible by --batch-gpu 4 x 1 process(es)"),
    (dict(status=-1), "--status must be a non-negative number of images, got -1"),
    (dict(max_nonfinite_status=0), "--max-nonfinite-status must be a positive integer, got 0"),
    (dict(lr=LrConfig(ref_lr=math.inf)), "--lr must be finite, got inf"),
    (dict(ema_stds=[0.05, math.nan]), "--ema-stds must be finite, got [0.05, nan]"),
    (dict(network=dict(dropout=math.nan)), "--dropout must be finite, got nan"),
    (dict(betas=[1.0, 0.99]), "--betas must lie in [0, 1), got [1.0, 0.99]"),
    (dict(lr=LrConfig(ref_lr=1e38), betas=[0.9, 0.99]), "is too large: Adam's first step overflows float32"),
    (dict(kernels="x"), "--kernels must be 'fast' or 'reference', got 'x'"),
    (dict(grad_sync="grouped"), "--grad-sync: expected one of ddp, flat, got 'grouped'"),
    (dict(network=dict(kappa=0.5)), "--kappa applies to --skip-scaling cs only"),
    (dict(network=dict(precision="fp8")), "--precision must be one of auto, fp32, fp16, bf16, got 'fp8'"),
    (dict(data=None), "--data is required"),
    (dict(compile="yes"), "the configuration: key 'compile' must be true or false or null, got 'yes'"),
    (dict(kernels=None, instruments=1), "key 'instruments' must be true or false or null, got 1"),
    (dict(batch=16.0), "--batch must be a positive number of images, got 16.0"),
    (dict(ema_halflife=-1), "--ema-halflife must be a non-negative number of images, got -1"),
    (dict(ema_halflife=math.inf), "--ema-halflife must be finite, got inf"),
    (dict(ema_halflife=655, ema_rampup=1.5), "--ema-rampup must lie in [0, 1] (a fraction of the images seen)"),
    (dict(ema_halflife=655, ema_rampup=-0.05), "--ema-rampup must lie in [0, 1]"),
    (dict(ema_halflife=655, ema_rampup=math.nan), "--ema-rampup must be finite, got nan"),
    (dict(ema_rampup=0.05), "--ema-rampup applies to the traditional EMA only: give --ema-halflife too"),
])
def test_validation_names_the_option(change, message):
    config = dataclasses.replace(TrainingConfig(data="d.zip", batch=16), **change)
    with pytest.raises(TrainingError) as e:
        config.validate(1)
    assert message in str(e.value)


def test_validate_resolves_batch_gpu_and_leaves_the_original_alone():
    config = TrainingConfig(data="d.zip", batch=16)
    assert config.validate(4).batch_gpu == 4 and config.batch_gpu is None
    with pytest.raises(TrainingError, match="--batch 16 must be divisible by the number of processes, 3"):
        config.validate(3)


def test_precision_auto_is_resolved_for_the_device():
    config = TrainingConfig(network=dict(precision="auto"))
    assert config.for_device(torch.device("cuda", 0)).network["precision"] == "fp16"
    assert config.for_device(torch.device("cpu")).network["precision"] == "fp32"
    assert config.network["precision"] == "auto"
    fixed = TrainingConfig(network=dict(precision="bf16"))
    assert fixed.for_device(torch.device("cuda", 0)).network["precision"] == "bf16"


def test_resumable_changes_come_from_the_field_flags():
    from training.run_dir import RESUMABLE_CHANGES as run_dir_changes
    from training.run_dir import config_differences

    flagged = [f.name for f in dataclasses.fields(TrainingConfig) if f.metadata.get("resumable")]
    assert run_dir_changes == RESUMABLE_CHANGES == tuple(flagged)
    speed = {"compile", "kernels", "grad_sync", "cudnn_benchmark", "instruments"}  # the shared contract
    assert speed <= set(RESUMABLE_CHANGES)
    assert not {"batch", "seed", "lr", "loss", "network", "betas", "ema_stds"} & set(RESUMABLE_CHANGES)
    old = TrainingConfig(data="a.zip", batch=16).to_dict()
    new = TrainingConfig(data="b.zip", batch=16, kernels="reference", grad_sync="flat", compile=True).to_dict()
    assert config_differences(old, new) == []
    assert config_differences(old, dict(new, batch=32)) == ["batch: 16 there, 32 now"]
    # A run recorded with the removed speed switches resumes: they are not compared.
    legacy = dict(LEGACY_OPTIONS)
    current = TrainingConfig.from_dict(LEGACY_OPTIONS).to_dict()
    assert config_differences(legacy, current) == []


@pytest.mark.parametrize("world,batch_gpu,batch", [(1, 8, 8), (1, 2, 8), (2, 4, 8), (2, 1, 8), (3, 2, 12), (4, 3, 24)])
def test_the_images_and_the_noise_of_each_process_agree(world, batch_gpu, batch):
    """Every process's images (InfiniteSampler) at each round are the step's global positions of the noise slice
    the loop takes (batch_chunk), and all processes and rounds together cover the global batch once."""
    size, steps = 10, 3  # epochs end mid-step: the permutation changes inside a batch
    whole = InfiniteSampler(size, batch, batch, seed=5)
    order = [next(it) for it in [iter(whole)] for _ in range(steps * batch)]  # one process, one round
    rounds = batch // (batch_gpu * world)
    for rank in range(world):
        it = iter(InfiniteSampler(size, batch, batch_gpu, rank, world, seed=5))
        for step in range(steps):
            for rnd in range(rounds):
                chunk = batch_chunk(rnd, rank, world, batch_gpu)
                images = [next(it) for _ in range(batch_gpu)]
                assert images == order[step * batch:(step + 1) * batch][chunk]
    covered = sorted(i for rnd in range(rounds) for rank in range(world)
                     for i in range(batch)[batch_chunk(rnd, rank, world, batch_gpu)])
    assert covered == list(range(batch))


def test_a_dict_is_taken_once_at_the_entry():
    legacy = dict(LEGACY_OPTIONS)
    assert TrainingConfig.coerce(legacy) == TrainingConfig.from_dict(legacy) and legacy == LEGACY_OPTIONS
    config = TrainingConfig(data="d.zip")
    copy = TrainingConfig.coerce(config)
    copy.network["x"] = 1
    assert copy is not config and config.network == {}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_recorded_with_the_removed_speed_switches_resumes(tmp_path):
    """A run directory of the code before --kernels: its options file and checkpoint hold channels_last, fused_step,
    batched_weights, fast_dropout, ddp_overlap and grad_sync 'grouped'; the resume goes on without a complaint."""
    from torch_utils.state_io import load_state, save_state
    from training.demo_data import write_demo_dataset
    from training.run_dir import list_checkpoints
    from training.training_loop import training_loop

    network = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], precision="fp32")
    c = dict(
        data=write_demo_dataset(str(tmp_path / "demo.zip"), num_images=16, resolution=8), network=network,
        duration=8, batch=4, status=4, snapshot=0, checkpoint=4, workers=0,
    )
    run = tmp_path / "run"
    training_loop(str(run), c)
    old = dict(channels_last=None, fused_step=None, batched_weights=True, fast_dropout=None, ddp_overlap=False,
               grad_sync="grouped")
    options = json.loads((run / "training_options.json").read_text())
    (run / "training_options.json").write_text(json.dumps(dict(options, **old)))
    (_, path), *_ = list_checkpoints(str(run))
    state = load_state(path)
    state["config"] = dict(state["config"], **old)
    save_state(path, state)
    summary = training_loop(str(run), dict(c, duration=12, kernels="reference"))
    assert summary["cur_nimg"] == 12 and summary["images_this_run"] == 4
    rewritten = json.loads((run / "training_options.json").read_text())
    assert not (set(old) - {"grad_sync"}) & set(rewritten) and rewritten["kernels"] == "reference"
    assert rewritten["grad_sync"] is None


def test_a_recorded_configuration_is_read_as_a_training_config():
    """check_config reads the run's options (or checkpoint) through TrainingConfig: a key it does not know or a value
    of the wrong type is named with the file, a legacy file compares equal to the same run today."""
    from training.run_dir import RunDirError, check_config

    now = TrainingConfig.from_dict(LEGACY_OPTIONS).to_dict()
    check_config("run", now, dict(LEGACY_OPTIONS), "run/training_options.json")
    with pytest.raises(RunDirError, match=r"^run/training_options\.json: unknown key 'speedy'.*another --outdir$"):
        check_config("run", now, dict(LEGACY_OPTIONS, speedy=True), "run/training_options.json")
    with pytest.raises(RunDirError, match=r"^run/x\.safetensors: key 'seed' must be an integer, got 'zero'"):
        check_config("run", now, dict(LEGACY_OPTIONS, seed="zero"), "run/x.safetensors")
    with pytest.raises(RunDirError, match=r"different configuration \(seed: 1 there, 0 now"):
        check_config("run", now, dict(LEGACY_OPTIONS, seed=1), "run/training_options.json")
