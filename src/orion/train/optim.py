"""The CPU half of a training step: AdamW on float32 master weights, the learning-rate schedule, gradient clipping
and fp16 loss scaling.

The ANE computes in fp16, so small gradients underflow unless the loss is scaled up (maderix scales by 256) and the
gradients are divided back on the CPU; an overflow then shows up as Inf/NaN gradients, and the step must be skipped
rather than let one bad step poison the weights (a NaN in the master weights never goes away). ``guarded_step``
strings these together in the order that keeps that promise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from orion.errors import BindingError, SettingsError

# Elements per float64 chunk when summing squares: 512 KB stays in cache, and big embeddings need no big temporary.
_NORM_CHUNK = 1 << 16
# Elements per piece of an elementwise pass over a parameter (AdamW's nine operations, unscaling and its check): the
# passes over one piece run while it is in cache. Elementwise, so the bits are those of whole-array passes.
_PIECE = 1 << 15


@dataclass(frozen=True)
class _Coefficients:
    """The scalars of one AdamW step, computed once per step exactly as PyTorch does (in Python floats)."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    bias_correction2_sqrt: float
    eps: float
    neg_step_size: float
    lr: float


def _adam_update(
    p: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    t1: np.ndarray,
    t2: np.ndarray,
    c: _Coefficients,
    decay: float,
) -> None:
    """One parameter's update, in PyTorch's operation order so the rounding matches; ``out`` may alias (p, m, v)."""
    p_out, m_out, v_out = out
    # m = m.lerp(g, 1 - beta1) = m + (1 - beta1) * (g - m)
    np.subtract(g, m, out=t1)
    t1 *= c.one_minus_beta1
    np.add(m, t1, out=m_out)
    # v = v * beta2 + ((1 - beta2) * g) * g   (mul_ then addcmul_)
    np.multiply(g, c.one_minus_beta2, out=t1)
    t1 *= g
    np.multiply(v, c.beta2, out=v_out)
    v_out += t1
    # p = p * (1 - lr * wd) + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)   (mul_ then addcdiv_)
    np.sqrt(v_out, out=t1)
    t1 /= c.bias_correction2_sqrt
    t1 += c.eps
    np.multiply(m_out, c.neg_step_size, out=t2)
    t2 /= t1
    if decay == 1.0:
        np.add(p, t2, out=p_out)
    else:
        np.multiply(p, decay, out=p_out)
        p_out += t2


def _all_finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _pieces(*arrays: np.ndarray) -> Iterable[tuple[np.ndarray, ...]]:
    """Matching flat pieces of ``_PIECE`` elements of arrays of one shape (views: writes land in the arrays); the
    arrays whole if one is not contiguous."""
    if not all(a.flags.c_contiguous for a in arrays):
        yield arrays
        return
    flats = [a.reshape(-1) for a in arrays]
    for start in range(0, flats[0].size, _PIECE):
        yield tuple(f[start:start + _PIECE] for f in flats)


class AdamW:
    """PyTorch's AdamW (decoupled weight decay, bias correction) on numpy float32 master weights, updated in place.

    ``no_decay`` picks the parameters that get no weight decay: ``None`` means every parameter with at most one
    dimension (norm gains and biases: decaying them towards 0 only hurts), a collection of names means exactly those,
    and a callable ``(name, array) -> bool`` decides per parameter.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        no_decay: Iterable[str] | Callable[[str, np.ndarray], bool] | None = None,
    ):
        _check_lr(lr)
        beta1, beta2 = betas
        for label, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
            if not 0.0 <= beta < 1.0:
                raise SettingsError(f"AdamW {label} = {beta!r} is outside [0, 1); use e.g. betas=(0.9, 0.95)")
        if not eps >= 0.0:
            raise SettingsError(f"AdamW eps = {eps!r} is negative or NaN; use e.g. eps=1e-8")
        if not weight_decay >= 0.0:
            raise SettingsError(f"AdamW weight_decay = {weight_decay!r} is negative or NaN; use e.g. 0.1 or 0.0")
        if not params:
            raise BindingError("AdamW got no parameters; pass a dict of name -> float32 numpy array")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype != np.float32:
                kind = p.dtype if isinstance(p, np.ndarray) else type(p).__name__
                raise BindingError(f"parameter {name!r} is {kind}; master weights must be float32 numpy arrays")
            if not p.flags.writeable:
                raise BindingError(f"parameter {name!r} is read-only; AdamW updates it in place, pass a writable copy")
            if not _all_finite(p):
                raise BindingError(f"parameter {name!r} holds NaN or Inf; fix the initialization or the checkpoint")
        self.params: dict[str, np.ndarray] = dict(params)
        self.lr = lr
        self.betas = (beta1, beta2)
        self.eps = eps
        self.weight_decay = weight_decay
        exempt = _no_decay_rule(no_decay, self.params)
        self.decay_names: frozenset[str] = frozenset(name for name, p in self.params.items() if not exempt(name, p))
        self.step_count = 0
        self._m = {name: np.zeros(p.shape, np.float32) for name, p in self.params.items()}
        self._v = {name: np.zeros(p.shape, np.float32) for name, p in self.params.items()}
        largest = max(p.size for p in self.params.values())  # a non-contiguous parameter is updated whole
        self._scratch = (np.empty(largest, np.float32), np.empty(largest, np.float32))
        # Where guarded steps write the next (p, m, v) before committing; allocated on the first guarded step.
        self._spare: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """Apply one AdamW update with ``grads`` (one per parameter, same shapes); ``lr`` overrides ``self.lr``."""
        self._check_grads(grads)
        c = self._coefficients(self.step_count + 1, self.lr if lr is None else lr)
        for name, p in self.params.items():
            decay = self._decay(name, c.lr)
            for piece, m, v, g in _pieces(p, self._m[name], self._v[name], grads[name]):
                _adam_update(piece, m, v, g, (piece, m, v), *self._temporaries(piece), c, decay)
        self.step_count += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the moments (``m.<name>``, ``v.<name>``) and the step count (``step``, a 0-d int64 array)."""
        state = {f"m.{name}": m.copy() for name, m in self._m.items()}
        state.update({f"v.{name}": v.copy() for name, v in self._v.items()})
        state["step"] = np.array(self.step_count, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the moments and step count bit for bit (the weights are the caller's, restored separately)."""
        expected = {f"{kind}.{name}" for kind in "mv" for name in self.params} | {"step"}
        missing, unknown = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unknown:
            raise BindingError(
                f"optimizer state does not fit the parameters: missing {missing}, unknown {unknown}; "
                "load a state saved from an optimizer over the same parameter names"
            )
        step = np.asarray(state["step"])
        if step.size != 1 or not np.issubdtype(step.dtype, np.integer) or int(step.reshape(())) < 0:
            raise BindingError(f"optimizer state 'step' = {step!r} is not one non-negative integer")
        for kind, moments in (("m", self._m), ("v", self._v)):
            for name, target in moments.items():
                value = np.asarray(state[f"{kind}.{name}"])
                if value.shape != target.shape or value.dtype != np.float32:
                    raise BindingError(
                        f"optimizer state {kind}.{name!r} is {value.dtype}{list(value.shape)}; parameter {name!r} "
                        f"needs float32{list(target.shape)}"
                    )
                if not _all_finite(value):
                    raise BindingError(f"optimizer state {kind}.{name!r} holds NaN or Inf; the checkpoint is corrupt")
        for kind, moments in (("m", self._m), ("v", self._v)):
            for name, target in moments.items():
                np.copyto(target, state[f"{kind}.{name}"])
        self.step_count = int(step.reshape(()))

    def _step_if_finite(self, grads: Mapping[str, np.ndarray], lr: float,
                        agree: Callable[[bool], bool] | None = None) -> bool:
        """``step``, but computed into spare buffers and committed only if every new weight and moment is finite;
        returns False (and changes nothing) otherwise. Committing swaps the moment buffers and copies the weights,
        so the guard costs one copy of the weights instead of a snapshot of weights and moments. ``agree`` turns
        "found a non-finite value here" into the decision of every process training the same weights."""
        self._check_grads(grads)
        if self._spare is None:
            self._spare = {
                name: tuple(np.empty(p.shape, np.float32) for _ in range(3)) for name, p in self.params.items()
            }
        c = self._coefficients(self.step_count + 1, lr)
        found = False
        for name, p in self.params.items():
            decay = self._decay(name, c.lr)
            for piece, m, v, g, *spare in _pieces(p, self._m[name], self._v[name], grads[name], *self._spare[name]):
                with np.errstate(all="ignore"):  # an overflow here is expected and handled: the step is refused
                    _adam_update(piece, m, v, g, spare, *self._temporaries(piece), c, decay)
                if not _all_finite(*spare):  # checked while the piece is in cache
                    found = True
                    break
            if found:
                break
        if agree is not None:
            found = agree(found)
        if found:
            return False
        for name, p in self.params.items():
            p_new, m_new, v_new = self._spare[name]
            np.copyto(p, p_new)
            self._spare[name] = (p_new, self._m[name], self._v[name])
            self._m[name], self._v[name] = m_new, v_new
        self.step_count += 1
        return True

    def _check_grads(self, grads: Mapping[str, np.ndarray]) -> None:
        missing, unknown = sorted(self.params.keys() - grads.keys()), sorted(grads.keys() - self.params.keys())
        if missing or unknown:
            raise BindingError(
                f"gradients do not match the parameters: missing {missing}, unknown {unknown}; "
                "pass exactly one gradient per parameter name"
            )
        for name, p in self.params.items():
            g = grads[name]
            if not isinstance(g, np.ndarray) or g.shape != p.shape or not np.issubdtype(g.dtype, np.floating):
                got = f"{g.dtype}{list(g.shape)}" if isinstance(g, np.ndarray) else type(g).__name__
                raise BindingError(f"gradient {name!r} is {got}; parameter {name!r} needs float{list(p.shape)}")

    def _coefficients(self, step: int, lr: float) -> _Coefficients:
        _check_lr(lr)
        beta1, beta2 = self.betas
        return _Coefficients(
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
            eps=self.eps,
            neg_step_size=-(lr / (1 - beta1**step)),
            lr=lr,
        )

    def _decay(self, name: str, lr: float) -> float:
        return 1 - lr * self.weight_decay if name in self.decay_names else 1.0

    def _temporaries(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple(s[: p.size].reshape(p.shape) for s in self._scratch)


def _no_decay_rule(
    no_decay: Iterable[str] | Callable[[str, np.ndarray], bool] | None, params: Mapping[str, np.ndarray]
) -> Callable[[str, np.ndarray], bool]:
    if no_decay is None:
        return lambda name, p: p.ndim <= 1
    if callable(no_decay):
        return no_decay
    names = {no_decay} if isinstance(no_decay, str) else set(no_decay)
    unknown = sorted(names - params.keys())
    if unknown:
        raise SettingsError(f"no_decay names {unknown} are not parameters; use names from the params dict")
    return lambda name, p: name in names


def _check_lr(lr: float) -> None:
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise SettingsError(f"learning rate {lr!r} is negative or not finite; use e.g. 3e-4")


def cosine_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 (step 0) to ``max_lr`` (step ``warmup_steps``), then a half cosine down to ``min_lr`` at
    ``total_steps``, and ``min_lr`` from then on (so running past the planned length is harmless)."""
    if not 0.0 <= min_lr <= max_lr:
        raise SettingsError(f"cosine_lr needs 0 <= min_lr <= max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise SettingsError(
            f"cosine_lr needs 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps!r}, "
            f"total_steps={total_steps!r}"
        )
    if step < 0:
        raise SettingsError(f"cosine_lr step {step!r} is negative; steps count from 0")
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _sum_of_squares(grads: Iterable[np.ndarray]) -> float:
    """Sum of squares in float64, a chunk at a time through one reused buffer (square + sum: BLAS ddot was several
    times slower here, its threads fighting over the cores)."""
    buffer = np.empty(_NORM_CHUNK, np.float64)
    total = 0.0
    for g in grads:
        flat = g.reshape(-1)
        for start in range(0, flat.size, _NORM_CHUNK):
            chunk = flat[start : start + _NORM_CHUNK]
            wide = buffer[: chunk.size]
            np.square(chunk, out=wide, dtype=np.float64)
            total += float(wide.sum())
    return total


def _check_max_norm(max_norm: float) -> None:
    if not max_norm > 0.0:
        raise SettingsError(f"max_norm = {max_norm!r} must be positive; use e.g. 1.0 (math.inf disables clipping)")


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm (summed in float64) is at most ``max_norm``, with
    ``torch.nn.utils.clip_grad_norm_``'s factor ``max_norm / (norm + 1e-6)``; return the norm before clipping.

    A non-finite norm leaves the gradients untouched (there is nothing meaningful to scale by) and is returned, so
    the caller can skip the step."""
    _check_max_norm(max_norm)
    norm = math.sqrt(_sum_of_squares(grads.values()))
    factor = max_norm / (norm + 1e-6)
    if math.isfinite(norm) and factor < 1.0:
        for g in grads.values():
            g *= factor
    return norm


_SCALER_MODES = ("dynamic", "static", "none")


class LossScaler:
    """Loss scaling against fp16 gradient underflow: multiply the loss (or the seed gradient) by ``scale`` before
    the ANE backward pass, then ``unscale`` the gradients on the CPU.

    ``dynamic`` follows ``torch.amp.GradScaler``: every overflow multiplies the scale by ``backoff_factor``, and
    ``growth_interval`` consecutive good steps multiply it by ``growth_factor``; here it also stays within
    [min_scale, max_scale]. ``static`` keeps ``init_scale`` (maderix: 256), ``none`` uses 1. Every mode counts the
    steps skipped for non-finite gradients in ``skipped_steps``.
    """

    def __init__(
        self,
        mode: str = "dynamic",
        init_scale: float = 256.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 200,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
    ):
        self._configure(mode, init_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale)
        self.growth_tracker = 0
        self.skipped_steps = 0

    def _configure(
        self,
        mode: str,
        init_scale: float,
        growth_factor: float,
        backoff_factor: float,
        growth_interval: int,
        min_scale: float,
        max_scale: float,
    ) -> None:
        if mode not in _SCALER_MODES:
            raise SettingsError(f"loss scaler mode {mode!r} is unknown; use one of {list(_SCALER_MODES)}")
        if not (growth_factor > 1.0 and math.isfinite(growth_factor)):
            raise SettingsError(f"growth_factor = {growth_factor!r} must be finite and > 1; use e.g. 2.0")
        if not 0.0 < backoff_factor < 1.0:
            raise SettingsError(f"backoff_factor = {backoff_factor!r} must be in (0, 1); use e.g. 0.5")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise SettingsError(f"growth_interval = {growth_interval!r} must be an integer >= 1; use e.g. 200")
        if not (0.0 < min_scale <= max_scale and math.isfinite(max_scale)):
            raise SettingsError(
                f"need 0 < min_scale <= max_scale < inf, got min_scale={min_scale!r}, max_scale={max_scale!r}"
            )
        if mode == "dynamic" and not min_scale <= init_scale <= max_scale:
            raise SettingsError(
                f"init_scale = {init_scale!r} is outside [min_scale, max_scale] = [{min_scale!r}, {max_scale!r}]"
            )
        if mode == "static" and not (init_scale > 0.0 and math.isfinite(init_scale)):
            raise SettingsError(f"init_scale = {init_scale!r} must be positive and finite; use e.g. 256.0")
        self.mode = mode
        self._scale = 1.0 if mode == "none" else float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)

    @property
    def scale(self) -> float:
        """The factor the loss must be multiplied by for this step."""
        return self._scale

    def unscale(self, grads: Mapping[str, np.ndarray]) -> bool:
        """Divide every gradient by ``scale`` in place; return False if any gradient holds NaN or Inf."""
        finite = True
        for name, g in grads.items():
            if not isinstance(g, np.ndarray) or g.dtype not in (np.float32, np.float64):
                kind = g.dtype if isinstance(g, np.ndarray) else type(g).__name__
                raise BindingError(
                    f"gradient {name!r} is {kind}; convert it to float32 before unscaling (in fp16 the divided "
                    "gradients underflow again)"
                )
            for (piece,) in _pieces(g):
                if self._scale != 1.0:
                    piece /= self._scale
                finite = finite and _all_finite(piece)
        return finite

    def update(self, found_nonfinite: bool) -> None:
        """Record the outcome of a step (call once per step, after ``unscale``) and adapt the scale."""
        if found_nonfinite:
            self.skipped_steps += 1
        if self.mode != "dynamic":
            return
        if found_nonfinite:
            self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self._scale = min(self._scale * self.growth_factor, self.max_scale)
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, str | float | int]:
        """Everything needed to resume, as plain JSON values (it goes into checkpoint headers)."""
        return {
            "mode": self.mode,
            "scale": self._scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "growth_tracker": self.growth_tracker,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, str | float | int]) -> None:
        """Restore a ``state_dict`` exactly, settings included (as ``torch.amp.GradScaler`` does)."""
        expected = set(self.state_dict())
        missing, unknown = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unknown:
            raise SettingsError(
                f"loss scaler state has missing keys {missing} and unknown keys {unknown}; pass a "
                "LossScaler.state_dict()"
            )
        for key in ("growth_tracker", "skipped_steps"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"loss scaler state {key} = {value!r} must be a non-negative integer")
        self._configure(
            state["mode"],
            state["scale"],
            state["growth_factor"],
            state["backoff_factor"],
            state["growth_interval"],
            state["min_scale"],
            state["max_scale"],
        )
        self.growth_tracker = state["growth_tracker"]
        self.skipped_steps = state["skipped_steps"]


@dataclass(frozen=True)
class StepReport:
    """What ``guarded_step`` did: ``grad_norm`` is the unscaled norm before clipping (NaN when the gradients were
    not finite) and ``scale`` the loss scale this step's gradients were divided by."""

    skipped: bool
    grad_norm: float
    scale: float
    lr: float


def guarded_step(
    optimizer: AdamW, scaler: LossScaler, grads: Mapping[str, np.ndarray], *, max_norm: float, lr: float,
    agree: Callable[[bool], bool] | None = None,
) -> StepReport:
    """Unscale, then skip the step on NaN/Inf gradients (weights and moments untouched, the scaler backs off), else
    clip and apply AdamW. The update is computed aside and committed only if every new weight and moment is finite;
    if one is not, nothing changes and the step counts as skipped like an overflow.

    ``agree`` maps "a non-finite value was found here" to the decision of all the processes of a data-parallel run
    (any of them found one), so they all skip the same steps and keep the same loss scale."""
    optimizer._check_grads(grads)
    _check_lr(lr)
    _check_max_norm(max_norm)
    scale = scaler.scale
    overflow = not scaler.unscale(grads)
    if agree is not None:
        overflow = agree(overflow)
    if overflow:
        scaler.update(True)
        return StepReport(skipped=True, grad_norm=math.nan, scale=scale, lr=lr)
    norm = clip_grad_norm(grads, max_norm)
    applied = optimizer._step_if_finite(grads, lr, agree)
    scaler.update(not applied)
    return StepReport(skipped=not applied, grad_norm=norm, scale=scale, lr=lr)
