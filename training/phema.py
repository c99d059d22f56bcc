"""Power-function EMA (EDM2 Sec. 3, App. C; docs/design.md §6): the profile math, post-hoc coefficients, trackers.

A power-function EMA profile with exponent g averages the training weights theta(tau), tau <= t, with
weight proportional to tau^g. Its width is expressed as the relative standard deviation std(g) of that
profile (Eq. 123). Training tracks a few such profiles (`PowerFunctionEMA`) and saves them as snapshots;
any other std can then be reconstructed after training as a linear combination of the snapshots
(`solve_posthoc_coefficients`, used by `edm2.phema_reconstruct`).

The math runs on numpy float64 arrays and broadcasts like numpy; scalars in give numpy scalars out.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterator, Sequence

import numpy as np
import torch

# The widest power-function profile: std(g) of Eq. 123 over g > -1 peaks where d/dg log std^2 = 1/(g+1) - 2/(g+2)
# - 1/(g+3) = 0, i.e. g^2 + 3g + 1 = 0, g* = (sqrt(5) - 3) / 2 ~ -0.382, where std^2 = (5 sqrt(5) - 11) / 2: std
# ~ 0.30028. Every std below that has a profile (the largest root of Eq. 126, g > g*; g >= 0 up to sqrt(1/12) ~
# 0.2887), and the inner products of Eq. 151 stay finite (g_a + g_b + 1 > 0). The official reconstruct_phema.py
# accepts std < 0.289; this limit contains that range.
STD_LIMIT = math.sqrt((5 * math.sqrt(5) - 11) / 2)  # exclusive
DEFAULT_STDS = (0.050, 0.100)  # the two profiles tracked during training by default (docs/design.md §6)


def _as_float64(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return array


def check_std(std: float, name: str = "std") -> float:
    """Validate one EMA length for tracking / reconstruction: a float in (0, STD_LIMIT)."""
    try:
        value = float(std)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, {STD_LIMIT:.5f}), got {std!r}") from None
    if not (0 < value < STD_LIMIT):
        raise ValueError(f"{name} must be in (0, {STD_LIMIT:.5f}) (the widest power-function profile), got {std!r}")
    return value


def exp_to_std(exp) -> np.ndarray:
    """Relative standard deviation of the power-function profile with exponent g (Eq. 123):
    std(g) = sqrt((g + 1) / ((g + 2)^2 (g + 3)))."""
    g = _as_float64("exp", exp)
    if np.any(g <= -1):
        raise ValueError(f"exp must be > -1 (the profile tau^g must be integrable), got {exp!r}")
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def _largest_real_root(std: float) -> float:
    """Largest real root of g^3 + 7 g^2 + (16 - std^-2) g + (12 - std^-2) = 0 (Eq. 126)."""
    inv_var = std**-2
    coefs = [1.0, 7.0, 16.0 - inv_var, 12.0 - inv_var]
    roots = np.roots(coefs)
    # Largest real part, as the official code takes it: near the widest std the two largest roots almost meet
    # and may come out as a complex pair whose real part is that (double) root.
    g = float(np.max(roots.real))
    # Polish with Newton steps: the companion-matrix eigenvalues are only accurate to ~1e-13 relative.
    for _ in range(4):
        f = ((g + 7) * g + 16 - inv_var) * g + 12 - inv_var
        df = (3 * g + 14) * g + 16 - inv_var
        if df == 0:
            break
        step = f / df
        g -= step
        if abs(step) <= 1e-16 * max(1.0, abs(g)):
            break
    return g


def std_to_exp(std) -> np.ndarray:
    """Exponent g of the power-function profile with relative std `std`: the largest real root of
    Eq. 126. `std` must be in (0, STD_LIMIT); g >= 0 for std <= sqrt(1/12), g in (-0.382, 0) above."""
    s = _as_float64("std", std)
    if np.any(s <= 0) or np.any(s >= STD_LIMIT):
        raise ValueError(f"std must be in (0, {STD_LIMIT:.5f}) (the widest power-function profile), got {std!r}")
    flat = np.array([_largest_real_root(float(v)) for v in s.reshape(-1)], dtype=np.float64)
    result = flat.reshape(s.shape)
    return result[()] if result.ndim == 0 else result


def power_function_beta(std, t_next, t_delta) -> np.ndarray:
    """Tracking coefficient after an update that brings the image count to t_next, t_delta images after
    the previous one: beta = (1 - t_delta / t_next)^(g + 1) (Eq. 127). ema = beta ema + (1 - beta) theta."""
    g = std_to_exp(std)
    t_next = _as_float64("t_next", t_next)
    t_delta = _as_float64("t_delta", t_delta)
    if np.any(t_delta <= 0) or np.any(t_delta > t_next):
        raise ValueError(f"need 0 < t_delta <= t_next, got t_delta={t_delta!r}, t_next={t_next!r}")
    return (1 - t_delta / t_next) ** (g + 1)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    """Inner product of two normalised power-function profiles ending at times a_ofs, b_ofs (Eq. 151):
    (g_a + 1)(g_b + 1)(t_a / t_b)^e / ((g_a + g_b + 1) max(t_a, t_b)), e = g_b if t_a < t_b else -g_a.
    Times in any common unit; arguments broadcast."""
    a_exp = std_to_exp(a_std)
    b_exp = std_to_exp(b_std)
    a_ofs = _as_float64("a_ofs", a_ofs)
    b_ofs = _as_float64("b_ofs", b_ofs)
    if np.any(a_ofs <= 0) or np.any(b_ofs <= 0):
        raise ValueError("profile end times (ofs) must be positive")
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    numerator = (a_exp + 1) * (b_exp + 1) * t_ratio**t_exp
    denominator = (a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs)
    return numerator / denominator


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Coefficients X [len(in), len(out)] such that sum_i X_ij theta_i (theta_i: the snapshot with profile
    (in_ofs[i], in_std[i])) best approximates the profile (out_ofs[j], out_std[j]) in the L2 sense.

    Solves A X = B with A_ik = <p_i, p_k> among the snapshots and B_ij = <p_i, q_j> (Eq. 151), then
    normalises every column to sum 1 so that the result is an average of the snapshots. Each (ofs, std) pair
    broadcasts like numpy, e.g. one output time (a scalar) for several stds, as in the official code.
    """
    pairs = []
    named = (("in_ofs", in_ofs, "in_std", in_std), ("out_ofs", out_ofs, "out_std", out_std))
    for a_name, a, b_name, b in named:
        a, b = _as_float64(a_name, a), _as_float64(b_name, b)
        try:
            a, b = np.broadcast_arrays(a, b)
        except ValueError:
            raise ValueError(f"{a_name} (shape {a.shape}) and {b_name} (shape {b.shape}) do not broadcast") from None
        pairs += [np.atleast_1d(a).reshape(-1), np.atleast_1d(b).reshape(-1)]
    in_ofs, in_std, out_ofs, out_std = pairs
    if in_ofs.shape != in_std.shape or in_ofs.size == 0:
        raise ValueError(
            f"in_ofs and in_std must be non-empty and of equal length, got {in_ofs.size} and {in_std.size}"
        )
    if out_ofs.shape != out_std.shape or out_ofs.size == 0:
        raise ValueError(
            f"out_ofs and out_std must be non-empty and of equal length, got {out_ofs.size} and {out_std.size}"
        )
    inputs = np.stack([in_ofs, in_std], axis=1)
    if len(np.unique(inputs, axis=0)) != len(inputs):
        raise ValueError("input profiles (in_ofs, in_std) must be distinct: duplicates make the system singular")
    A = power_function_correlation(in_ofs[:, None], in_std[:, None], in_ofs[None, :], in_std[None, :])
    B = power_function_correlation(in_ofs[:, None], in_std[:, None], out_ofs[None, :], out_std[None, :])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------------------------------------
# Trackers used during training.


def _frozen_copy(net: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def _blend_into(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema = beta * ema + (1 - beta) * net for parameters; buffers are copied (they are not trained)."""
    ema_params = list(ema.parameters())
    net_params = [p.detach() for p in net.parameters()]
    if len(ema_params) != len(net_params):
        raise ValueError(
            f"EMA update: the network has {len(net_params)} parameters, the tracked copy {len(ema_params)}"
        )
    if ema_params:
        torch._foreach_lerp_(ema_params, net_params, 1 - beta)
    for ema_buf, net_buf in zip(ema.buffers(), net.buffers()):
        ema_buf.copy_(net_buf)


def _check_step(cur_nimg: int, batch_size: int, who: str) -> None:
    if not (isinstance(batch_size, numbers.Real) and batch_size > 0):
        raise ValueError(f"{who}.update: batch_size must be a positive number, got {batch_size!r}")
    if not (isinstance(cur_nimg, numbers.Real) and cur_nimg >= batch_size):
        raise ValueError(
            f"{who}.update: cur_nimg (images seen after this step) must be >= batch_size {batch_size}, got {cur_nimg!r}"
        )


class PowerFunctionEMA:
    """Tracks power-function EMAs of a network during training, one per std (Eq. 127; docs/design.md §6).

    Call `update(net, cur_nimg, batch_size)` after every optimizer step (before the forced weight normalization,
    as the official training loop does), with cur_nimg the images seen *after* the step. The first update (cur_nimg ==
    batch_size) gives beta = 0, i.e. a copy of the network. The EMA networks are frozen copies in eval mode.
    """

    def __init__(
        self,
        net: torch.nn.Module,  # the network being trained; copied once per std
        stds: Sequence[float] = DEFAULT_STDS,  # relative stds of the tracked profiles
    ):
        stds = [check_std(s, f"PowerFunctionEMA: stds[{i}]") for i, s in enumerate(stds)]
        if not stds:
            raise ValueError("PowerFunctionEMA: stds must not be empty")
        if len(set(stds)) != len(stds):
            raise ValueError(f"PowerFunctionEMA: stds must be distinct, got {stds}")
        self.stds = stds
        self.exps = [float(std_to_exp(s)) for s in stds]
        self.emas = [_frozen_copy(net) for _ in stds]

    def betas(self, cur_nimg: int, batch_size: int) -> list[float]:
        """The decay of each EMA for the step that brought training to cur_nimg images (Eq. 127)."""
        _check_step(cur_nimg, batch_size, "PowerFunctionEMA")
        return [(1 - batch_size / cur_nimg) ** (g + 1) for g in self.exps]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int) -> None:
        for ema, beta in zip(self.emas, self.betas(cur_nimg, batch_size)):
            _blend_into(ema, net, beta)

    def ema_networks(self) -> list[tuple[float, torch.nn.Module]]:
        """[(std, ema network)] in the order of `stds`."""
        return list(zip(self.stds, self.emas))

    def __iter__(self) -> Iterator[tuple[float, torch.nn.Module]]:
        return iter(self.ema_networks())

    def __len__(self) -> int:
        return len(self.emas)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat {name: tensor} dict (safetensors-friendly): 'stds' (float64) and 'ema.{i}.{key}'."""
        state = {"stds": torch.tensor(self.stds, dtype=torch.float64)}
        for i, ema in enumerate(self.emas):
            for key, value in ema.state_dict().items():
                state[f"ema.{i}.{key}"] = value.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the EMAs bit-exactly; the stds in `state` must equal this tracker's stds."""
        if "stds" not in state:
            raise ValueError("PowerFunctionEMA.load_state_dict: missing 'stds'")
        saved = [float(s) for s in state["stds"].tolist()]
        if saved != self.stds:
            raise ValueError(f"PowerFunctionEMA.load_state_dict: state tracks stds {saved}, this tracker {self.stds}")
        for i, ema in enumerate(self.emas):
            prefix = f"ema.{i}."
            ema.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


class TraditionalEMA:
    """A classic exponential moving average with a half-life in images and an optional ramp-up (EDM, Karras et al.
    2022; the ablation ladder's configs A-B, docs/design.md §13): beta = 0.5^(batch / max(h, 1e-8)) with
    h = min(halflife_nimg, rampup_ratio * n), n the images seen.

    `count_before_step` picks n: False (default) the images seen after the step, as the official EDM2 class;
    True the images seen before it, as EDM's training loop (its first update, at n = 0, copies the network, like
    the power-function EMA's). `update` and `betas` take cur_nimg after the step either way, as PowerFunctionEMA.

    The defaults are the official EDM2 code's (halflife_nimg=inf, rampup_ratio=0.09): the half-life is always
    9% of the images seen, i.e. the EMA forgets at a fixed fraction of training time. (EDM's own defaults were a
    500k-image half-life with rampup_ratio 0.05; pass them explicitly to compare with EDM.)

    It offers PowerFunctionEMA's interface with one network (`emas`, `betas`, `update`, iteration, state dicts), so
    the training loop's post-step (fused or not) updates either kind the same way."""

    def __init__(
        self,
        net: torch.nn.Module,  # the network being trained; copied once
        halflife_nimg: float = math.inf,  # half-life of the average, in training images (official default: inf)
        rampup_ratio: float | None = 0.09,  # cap the half-life at this fraction of the images seen; None = off
        count_before_step: bool = False,  # the ramp-up counts the images before the step (EDM) or after (EDM2)
    ):
        if not (isinstance(halflife_nimg, numbers.Real) and not isinstance(halflife_nimg, bool) and halflife_nimg >= 0):
            raise ValueError(f"TraditionalEMA: halflife_nimg must be a non-negative number, got {halflife_nimg!r}")
        if rampup_ratio is not None and not (
            isinstance(rampup_ratio, numbers.Real) and not isinstance(rampup_ratio, bool) and 0 <= rampup_ratio <= 1
        ):
            raise ValueError(f"TraditionalEMA: rampup_ratio must be a number in [0, 1] or None, got {rampup_ratio!r}")
        if math.isinf(halflife_nimg) and rampup_ratio is None:
            raise ValueError("TraditionalEMA: an infinite halflife_nimg needs a rampup_ratio (else it never updates)")
        self.halflife_nimg = float(halflife_nimg)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.count_before_step = bool(count_before_step)
        self.ema = _frozen_copy(net)

    @property
    def emas(self) -> list[torch.nn.Module]:
        """The tracked copy, as a list (PowerFunctionEMA's attribute, read by the post-step)."""
        return [self.ema]

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        """The decay of the step that brought training to cur_nimg images (after the step)."""
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            seen = cur_nimg - batch_size if self.count_before_step else cur_nimg
            halflife = min(halflife, seen * self.rampup_ratio)  # short memory early in training
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    def betas(self, cur_nimg: int, batch_size: int) -> list[float]:
        """[beta]: PowerFunctionEMA's interface, one EMA."""
        _check_step(cur_nimg, batch_size, "TraditionalEMA")
        return [self.beta(cur_nimg, batch_size)]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int) -> None:
        (beta,) = self.betas(cur_nimg, batch_size)
        _blend_into(self.ema, net, beta)

    def ema_networks(self) -> list[tuple[None, torch.nn.Module]]:
        """[(None, ema network)]: None because a traditional EMA has no power-function std."""
        return [(None, self.ema)]

    def __iter__(self) -> Iterator[tuple[None, torch.nn.Module]]:
        return iter(self.ema_networks())

    def __len__(self) -> int:
        return 1

    def describe(self) -> dict[str, float | bool | None]:
        """The settings as JSON values (a snapshot's header): an infinite half-life as None."""
        halflife = None if math.isinf(self.halflife_nimg) else self.halflife_nimg
        return dict(kind="traditional", halflife_nimg=halflife, rampup_ratio=self.rampup_ratio,
                    count_before_step=self.count_before_step)  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat {name: tensor} dict (safetensors-friendly): the settings (a ramp-up ratio of None as -1) and
        'ema.{key}'."""
        state = {
            "halflife_nimg": torch.tensor(self.halflife_nimg, dtype=torch.float64),
            "rampup_ratio": torch.tensor(-1.0 if self.rampup_ratio is None else self.rampup_ratio, dtype=torch.float64),
        }
        state.update({f"ema.{k}": v.detach().clone() for k, v in self.ema.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the EMA bit-exactly; the half-life and ramp-up in `state` (where recorded) must be this tracker's."""
        if "stds" in state:
            raise ValueError("TraditionalEMA.load_state_dict: the state holds power-function EMAs (it has 'stds')")
        ratio = -1.0 if self.rampup_ratio is None else self.rampup_ratio
        for key, value in dict(halflife_nimg=self.halflife_nimg, rampup_ratio=ratio).items():
            if key in state and float(state[key]) != value:
                raise ValueError(
                    f"TraditionalEMA.load_state_dict: the state has {key} {float(state[key])}, this tracker {value}"
                )
        self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")}, strict=True)
