"""Per-seed images of generate.py against the official generate_images.py, same tiny network, same device.

    python benchmarks/check_official_generate.py --official-dir .official [--device cuda] [--out FILE]

The official code (a copy the user gives; it is not part of this project) runs in a subprocess, because its
packages `torch_utils` and `training` share names with this project's. There it builds a tiny EDM2 network
with the official classes (fixed seed; attention at 8x8 with two heads), pickles it as the official training
loop does (float16 tensors), and generates images with its generate_images(); on CUDA once as the pickle says
(fp16 activations) and once with use_fp16=False (fp32). Here the pickle is loaded with the project's
allow-listed unpickler and sampled with edm2.generate_batch, the noise drawn on the compute device as by
default and by the official code, in each configuration: on the CPU the default one (fp32); on CUDA the
default (`generate.py` without options: fast kernels) and `--kernels reference`, each in fp16 (the default for
official pickles) and fp32. Prints JSON: per configuration and setting, the fraction of 8-bit values that
differ by one level, by more, and the largest difference. --save-reference DIR also writes the pickle (its
embedded module source replaced by a note) and the official images, as stored in tests/data/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
# Settings compared: seeds (one > 2^32, which the official code takes modulo 2^32), class, sampler options.
CONFIGS = {
    "ode": dict(seeds=[0, 1, 2, 3, 4, 5, 2**32 + 7], class_idx=None, sampler=dict(num_steps=32)),
    "churn_class": dict(
        seeds=[7, 8, 9], class_idx=3, sampler=dict(num_steps=12, S_churn=20.0, S_min=0.05, S_max=20.0)
    ),
}
# The official Precond's arguments: two levels, attention at 8x8 with two heads of 16 channels.
NETWORK = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16)
# What the official side needs: its own imports (dnnlib.util imports requests) and this script's.
OFFICIAL_NEEDS = ["torch", "numpy", "click", "tqdm", "PIL", "requests"]
NOTE = "# module source omitted from this copy (see tests/data/NOTES.md)\n"


def probe_inputs():
    """Fixed network inputs (x, sigma, one-hot labels) at three noise levels, for the network outputs' comparison."""
    import torch

    g = torch.Generator().manual_seed(2)
    x = torch.randn([4, 3, 16, 16], generator=g)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 3, 7, 9]), 10).to(torch.float32)
    return [(x * sigma, torch.tensor(sigma), labels) for sigma in (80.0, 1.2, 0.01)]


def _missing(modules: list[str]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def official_worker(official_dir: str, device: str, workdir: str, save_dir: str | None) -> None:
    """Runs with the official code first on sys.path: network, official pickle, official images."""
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != REPO]
    sys.path.insert(0, official_dir)
    import pickle

    import numpy as np
    import torch
    import dnnlib
    from training.encoders import StandardRGBEncoder
    from training.networks_edm2 import Precond
    from generate_images import generate_images

    torch.manual_seed(0)
    net = Precond(16, 3, 10, **NETWORK)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:  # gains start at 0 (the network would output nothing): give them random values
                p.copy_(torch.rand([], generator=gen) + 0.5)
    data = dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=dict(resolution=16), loss_fn=None)
    data.ema = net.cpu().eval().requires_grad_(False).to(torch.float16)  # as the official snapshots
    pkl = os.path.join(workdir, "tiny.pkl")
    with open(pkl, "wb") as f:
        pickle.dump(data, f)
    torch.distributed.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
    out = {}
    # On the CPU the official Precond ignores use_fp16: one run. On CUDA: as pickled (fp16), and fp32.
    for precision in ["fp16", "fp32"] if device == "cuda" else ["fp32"]:
        with open(pkl, "rb") as f:
            module = pickle.load(f)["ema"]
        module.use_fp16 = precision == "fp16"
        for name, cfg in CONFIGS.items():
            images = {}
            it = generate_images(net=module.to(device), encoder=StandardRGBEncoder(), seeds=cfg["seeds"],
                                 class_idx=cfg["class_idx"], device=torch.device(device), verbose=False,
                                 **cfg["sampler"])
            for r in it:
                for seed, image in zip(r.seeds, r.images.cpu().numpy()):
                    images[seed] = image
            out[f"{precision}/{name}"] = np.stack([images[s] for s in cfg["seeds"]])
        with torch.no_grad():
            for i, (x, sigma, labels) in enumerate(probe_inputs()):
                out[f"D/{precision}/{i}"] = module(x.to(device), sigma.to(device), labels.to(device)).cpu().numpy()
    np.savez(os.path.join(workdir, "official.npz"), **out)
    if save_dir is not None:
        classes = {type(m) for m in data.ema.modules()} | {type(data.encoder)}
        saved = {c: c._orig_module_src for c in classes if hasattr(c, "_orig_module_src")}
        for c in saved:
            c._orig_module_src = NOTE
        with open(os.path.join(save_dir, "official_generate_tiny.pkl"), "wb") as f:
            pickle.dump(data, f)
        for c, src in saved.items():
            c._orig_module_src = src
        cpu_images = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("fp32/")}
        np.savez(os.path.join(save_dir, "official_generate_images.npz"), configs=json.dumps(CONFIGS),
                 network=json.dumps(NETWORK), **cpu_images)
    torch.distributed.destroy_process_group()


def compare(a, b) -> dict:
    import numpy as np

    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"frac_diff_1": float((d == 1).mean()), "frac_diff_gt1": float((d > 1).mean()), "max_diff": int(d.max())}


def project_images(net, device: str, precision: str, kernels: str) -> dict:
    """This project's images for every setting of CONFIGS, in one configuration of generate.py: kernels 'fast',
    'compiled' (fast and torch.compile, generate.py's default from 2048 images per GPU) or 'reference'."""
    import torch

    from edm2.generation import generate_batch, prepare_for_sampling

    net.precision = precision
    net = prepare_for_sampling(net, compile=kernels == "compiled", reference=kernels == "reference")
    out = {name: generate_batch(net, cfg["seeds"], class_idx=cfg["class_idx"], device=device, **cfg["sampler"]).numpy()
           for name, cfg in CONFIGS.items()}
    with torch.no_grad():
        for i, (x, sigma, labels) in enumerate(probe_inputs()):
            out[f"D/{i}"] = net(x.to(device), sigma.to(device), labels.to(device)).cpu().numpy()
    return out


def compare_outputs(ours: dict, official: dict, precision: str) -> dict:
    """The network's outputs D(x; sigma) on the probe inputs: the fraction of bitwise equal values, the largest
    difference relative to the largest official value."""
    import numpy as np

    pairs = [(ours[f"D/{i}"], official[f"D/{precision}/{i}"]) for i in range(len(probe_inputs()))]
    return {"equal_frac": float(np.mean([np.mean(a == b) for a, b in pairs])),
            "max_rel": float(max(np.abs(a - b).max() / np.abs(b).max() for a, b in pairs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official-dir", required=True, help="folder of a copy of the official EDM2 repository")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="JSON file  [default: $OUT/check_official_generate.json if set]")
    ap.add_argument("--save-reference", default=None, metavar="DIR")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        official_worker(args.official_dir, args.device, args.worker, args.save_reference)
        return
    if not (pathlib.Path(args.official_dir) / "generate_images.py").is_file():
        sys.exit(f"--official-dir: {args.official_dir} holds no generate_images.py (expected the official EDM2 repo)")
    missing = _missing(OFFICIAL_NEEDS)
    if missing:
        sys.exit(f"check_official_generate: the official code needs the Python packages {missing}, missing here; "
                 "install them to run this check")
    import numpy as np
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    sys.path.insert(0, str(REPO))
    import edm2
    from edm2.generation import sampling_precision

    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, __file__, "--official-dir", str(pathlib.Path(args.official_dir).resolve()),
               "--device", args.device, "--worker", workdir]
        if args.save_reference:
            os.makedirs(args.save_reference, exist_ok=True)
            cmd += ["--save-reference", str(pathlib.Path(args.save_reference).resolve())]
        run = subprocess.run(cmd, cwd=args.official_dir, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"check_official_generate: the official side failed: {run.stderr.strip().splitlines()[-1:]}")
        official = dict(np.load(os.path.join(workdir, "official.npz")))
        loaded = edm2.load_network(os.path.join(workdir, "tiny.pkl"), device=args.device)
        default_precision = sampling_precision(loaded.net.precision, args.device)  # generate.py's: fp16 on CUDA
        results, meets = {}, {}
        runs = [("fp32", "fast")]  # the CPU computes in the reference order either way
        if args.device == "cuda":
            runs = [(p, k) for p in ("fp16", "fp32") for k in ("fast", "compiled", "reference")]
        for precision, kernels in runs:
            ours = project_images(loaded.net, args.device, precision, kernels)
            label = f"{precision}{' (default)' if precision == default_precision else ''}/kernels={kernels}"
            results[f"{label}/network_output"] = compare_outputs(ours, official, precision)
            for name in CONFIGS:
                results[f"{label}/{name}"] = r = compare(ours[name], official[f"{precision}/{name}"])
                meets[label] = meets.get(label, True) and r["frac_diff_1"] <= 0.001 and r["max_diff"] <= 1
    report = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "target": "frac_diff_1 <= 0.001 and max_diff <= 1", "meets_target": meets, "results": results}
    text = json.dumps(report, indent=1)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "check_official_generate.json") if "OUT" in os.environ else None)
    if out:
        pathlib.Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
