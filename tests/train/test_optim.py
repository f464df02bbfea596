"""The CPU optimizer side of training, checked against PyTorch (CPU) as the independent oracle: AdamW, the
clip, the loss scaler's rules; plus the guarantees of ``guarded_step`` (skipped steps change nothing)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from orion.errors import BindingError, OrionError, SettingsError
from orion.train.optim import AdamW, LossScaler, clip_grad_norm, cosine_lr, guarded_step

SHAPES = {"wte": (40, 16), "attn.w": (16, 3, 16), "attn.b": (48,), "norm.g": (16,), "head": (16, 40)}


def random_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def random_grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gradients over several orders of magnitude, so the bias corrections and eps both matter."""
    scale = 10.0 ** rng.uniform(-7, 1)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def torch_adamw(params, decayed, lr, betas, eps, weight_decay):
    tensors = {name: torch.tensor(p.copy(), requires_grad=True) for name, p in params.items()}
    groups = [
        {"params": [t for n, t in tensors.items() if n in decayed], "weight_decay": weight_decay},
        {"params": [t for n, t in tensors.items() if n not in decayed], "weight_decay": 0.0},
    ]
    return tensors, torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def assert_near(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Max abs difference within 1e-6 of the array's magnitude: torch's fused multiply-adds round differently, and
    relative to each element would fail where a moment nearly cancels."""
    scale = float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs).max()) <= 1e-6 * scale, what


def assert_close_to_torch(optimizer: AdamW, tensors, reference) -> None:
    state = optimizer.state_dict()
    for name, t in tensors.items():
        assert_near(optimizer.params[name], t.detach().numpy(), name)
        assert_near(state[f"m.{name}"], reference.state[t]["exp_avg"].numpy(), f"m.{name}")
        assert_near(state[f"v.{name}"], reference.state[t]["exp_avg_sq"].numpy(), f"v.{name}")


@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},  # maderix
        {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},  # Orion's Adam
        {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.5},
    ],
)
def test_adamw_matches_torch_over_20_steps(hyper):
    params = random_params(0)
    optimizer = AdamW({n: p.copy() for n, p in params.items()}, **hyper)
    # The default rule: 1-D parameters (biases, norm gains) get no decay.
    assert optimizer.decay_names == {"wte", "attn.w", "head"}
    tensors, reference = torch_adamw(params, optimizer.decay_names, **hyper)
    rng = np.random.default_rng(1)
    for step in range(20):
        grads = random_grads(rng)
        lr = hyper["lr"] * (1.0 - step / 40)  # a per-step learning rate, as a schedule passes it
        optimizer.step(grads, lr=lr)
        for group in reference.param_groups:
            group["lr"] = lr
        for name, t in tensors.items():
            t.grad = torch.from_numpy(grads[name].copy())
        reference.step()
        assert_close_to_torch(optimizer, tensors, reference)
    assert optimizer.step_count == 20


@pytest.mark.parametrize(
    "no_decay, decayed",
    [
        (["wte", "norm.g"], {"attn.w", "attn.b", "head"}),
        ("head", {"wte", "attn.w", "attn.b", "norm.g"}),
        (lambda name, p: name.startswith("attn"), {"wte", "norm.g", "head"}),
        ((), set(SHAPES)),
    ],
)
def test_no_decay_choices_match_torch_param_groups(no_decay, decayed):
    params = random_params(2)
    optimizer = AdamW({n: p.copy() for n, p in params.items()}, lr=1e-2, weight_decay=0.3, no_decay=no_decay)
    assert optimizer.decay_names == decayed
    tensors, reference = torch_adamw(params, decayed, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.3)
    rng = np.random.default_rng(3)
    for _ in range(5):
        grads = random_grads(rng)
        optimizer.step(grads)
        for name, t in tensors.items():
            t.grad = torch.from_numpy(grads[name].copy())
        reference.step()
    assert_close_to_torch(optimizer, tensors, reference)


def test_adamw_does_not_modify_gradients():
    optimizer = AdamW(random_params(4))
    grads = random_grads(np.random.default_rng(5))
    before = {n: g.copy() for n, g in grads.items()}
    optimizer.step(grads)
    assert all(np.array_equal(grads[n], before[n]) for n in grads)


def test_resume_from_state_dict_is_bitwise_identical():
    rng = np.random.default_rng(6)
    grads = [random_grads(rng) for _ in range(10)]
    straight = AdamW(random_params(7), lr=1e-3)
    for g in grads:
        straight.step(g)

    first = AdamW(random_params(7), lr=1e-3)
    for g in grads[:5]:
        first.step(g)
    saved_weights = {n: p.copy() for n, p in first.params.items()}
    saved_state = first.state_dict()
    first.step(grads[5])  # the saved state must be a copy, not a view of the live moments
    assert int(saved_state["step"]) == 5

    resumed = AdamW(saved_weights, lr=1e-3)
    resumed.load_state_dict(saved_state)
    for g in grads[5:]:
        resumed.step(g)
    for name in SHAPES:
        assert np.array_equal(resumed.params[name], straight.params[name])
    final, expected = resumed.state_dict(), straight.state_dict()
    assert final.keys() == expected.keys()
    assert all(np.array_equal(final[k], expected[k]) for k in final)


def test_load_state_dict_accepts_a_one_element_step_array():
    optimizer = AdamW(random_params(8))
    state = optimizer.state_dict()
    state["step"] = np.array([3], dtype=np.int32)
    optimizer.load_state_dict(state)
    assert optimizer.step_count == 3


def test_adamw_rejects_mismatched_gradients_and_state():
    optimizer = AdamW(random_params(9))
    grads = random_grads(np.random.default_rng(10))
    missing = {n: g for n, g in grads.items() if n != "head"}
    with pytest.raises(BindingError, match="missing \\['head'\\]"):
        optimizer.step(missing)
    with pytest.raises(BindingError, match="unknown \\['typo'\\]"):
        optimizer.step({**grads, "typo": grads["head"]})
    with pytest.raises(BindingError, match="'wte'"):
        optimizer.step({**grads, "wte": grads["wte"].T})
    with pytest.raises(BindingError, match="'wte'"):
        optimizer.step({**grads, "wte": grads["wte"].astype(np.int32)})
    assert optimizer.step_count == 0

    state = optimizer.state_dict()
    with pytest.raises(BindingError, match="missing \\['m.head'\\]"):
        optimizer.load_state_dict({k: v for k, v in state.items() if k != "m.head"})
    with pytest.raises(BindingError, match="v.'norm.g'"):
        optimizer.load_state_dict({**state, "v.norm.g": np.zeros(17, np.float32)})
    with pytest.raises(BindingError, match="NaN"):
        optimizer.load_state_dict({**state, "m.wte": np.full(SHAPES["wte"], np.nan, np.float32)})


def test_adamw_rejects_bad_parameters_and_settings():
    with pytest.raises(BindingError, match="float64"):
        AdamW({"w": np.zeros(3)})
    with pytest.raises(BindingError, match="NaN or Inf"):
        AdamW({"w": np.array([1.0, np.inf], np.float32)})
    with pytest.raises(BindingError, match="no parameters"):
        AdamW({})
    with pytest.raises(SettingsError, match="betas\\[1\\]"):
        AdamW(random_params(0), betas=(0.9, 1.0))
    with pytest.raises(SettingsError, match="learning rate"):
        AdamW(random_params(0), lr=-1.0)
    with pytest.raises(SettingsError, match="\\['nope'\\]"):
        AdamW(random_params(0), no_decay=["nope"])
    optimizer = AdamW(random_params(0))
    with pytest.raises(SettingsError, match="learning rate nan"):
        optimizer.step(random_grads(np.random.default_rng(0)), lr=math.nan)
    assert optimizer.step_count == 0


def hand_cosine(step, max_lr, warmup, total, min_lr):
    if step < warmup:
        return max_lr * step / warmup
    if step > total:
        return min_lr
    t = (step - warmup) / (total - warmup)
    return min_lr + (max_lr - min_lr) * (math.cos(math.pi * t) + 1) / 2


@pytest.mark.parametrize("warmup, total, min_lr", [(5, 20, 1e-4), (0, 10, 0.0), (100, 1000, 3e-5)])
def test_cosine_lr_matches_hand_formula_and_torch_schedulers(warmup, total, min_lr):
    max_lr = 1e-3
    ours = [
        cosine_lr(s, max_lr=max_lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr) for s in range(total + 1)
    ]
    for step, lr in enumerate(ours):
        assert lr == pytest.approx(hand_cosine(step, max_lr, warmup, total, min_lr), rel=1e-12, abs=1e-18)

    # torch: LinearLR warmup (its start factor must be > 0, so nearly 0) then CosineAnnealingLR.
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=max_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=total - warmup, eta_min=min_lr)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(sgd, start_factor=1e-12, end_factor=1.0, total_iters=warmup)
        schedule = torch.optim.lr_scheduler.SequentialLR(sgd, [linear, cosine], milestones=[warmup])
    else:
        schedule = cosine
    theirs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(total + 1):
            theirs.append(sgd.param_groups[0]["lr"])
            sgd.step()
            schedule.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-14)


def test_cosine_lr_with_lambda_lr_at_sample_points():
    max_lr, warmup, total = 6e-4, 10, 100
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=max_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        sgd, lambda s: hand_cosine(s, max_lr, warmup, total, 0.0) / max_lr
    )
    samples = {0, 1, 9, 10, 11, 50, 99, 100}
    for step in range(total + 1):
        if step in samples:
            ours = cosine_lr(step, max_lr=max_lr, warmup_steps=warmup, total_steps=total)
            assert ours == pytest.approx(sgd.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        sgd.step()
        schedule.step()


@given(
    step=st.integers(0, 3000),
    warmup=st.integers(0, 500),
    extra=st.integers(0, 2000),
    max_lr=st.floats(1e-6, 1.0),
    ratio=st.floats(0.0, 1.0),
)
def test_cosine_lr_stays_in_range_and_ends_at_min_lr(step, warmup, extra, max_lr, ratio):
    total, min_lr = warmup + extra, max_lr * ratio
    lr = cosine_lr(step, max_lr=max_lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
    assert 0.0 <= lr <= max_lr * (1 + 1e-12)
    if step >= warmup:
        assert lr >= min_lr * (1 - 1e-12)
    if step >= total:
        assert lr == min_lr
    if warmup <= step < total:
        later = cosine_lr(step + 1, max_lr=max_lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
        assert later <= lr * (1 + 1e-12)


def test_cosine_lr_rejects_bad_settings():
    with pytest.raises(SettingsError, match="min_lr"):
        cosine_lr(0, max_lr=1e-4, warmup_steps=0, total_steps=10, min_lr=1e-3)
    with pytest.raises(SettingsError, match="warmup_steps=20"):
        cosine_lr(0, max_lr=1e-4, warmup_steps=20, total_steps=10)
    with pytest.raises(SettingsError, match="negative"):
        cosine_lr(-1, max_lr=1e-4, warmup_steps=0, total_steps=10)


@pytest.mark.parametrize("max_norm", [1.0, 0.05, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    grads = random_grads(np.random.default_rng(11))
    grads = {n: g * (1.0 / np.abs(g).max()) for n, g in grads.items()}  # norm of order 10
    tensors = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.from_numpy(g.copy())
    expected_norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))

    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for t, g in zip(tensors, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=0)
    clipped = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert clipped <= max_norm * (1 + 1e-6)


def test_clip_grad_norm_leaves_non_finite_gradients_alone():
    grads = {"a": np.array([1.0, np.inf], np.float32), "b": np.array([3.0], np.float32)}
    assert clip_grad_norm(grads, 1.0) == math.inf
    assert grads["b"][0] == 3.0
    with pytest.raises(SettingsError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


OVERFLOW_SCRIPT = [0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]


def test_dynamic_scaler_follows_torch_grad_scaler_with_a_state_round_trip():
    """Same scripted overflow sequence through both; halfway, our state goes through JSON into a new scaler."""
    param = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([param], lr=0.1)
    reference = torch.amp.GradScaler("cpu", init_scale=256.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    scaler = LossScaler("dynamic", init_scale=256.0, growth_interval=3)
    for i, overflow in enumerate(OVERFLOW_SCRIPT):
        if i == len(OVERFLOW_SCRIPT) // 2:
            restored = LossScaler("static", init_scale=3.0)
            restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
            assert restored.state_dict() == scaler.state_dict()
            scaler = restored
        reference.scale(torch.ones(()))
        param.grad = torch.full((2,), math.inf if overflow else 1.0)
        reference.step(sgd)
        reference.update()

        assert scaler.unscale({"g": np.full(2, math.inf if overflow else 1.0, np.float32)}) is not bool(overflow)
        scaler.update(bool(overflow))
        assert scaler.scale == reference.get_scale()
        assert scaler.growth_tracker == int(reference.state_dict()["_growth_tracker"])
    assert scaler.skipped_steps == sum(OVERFLOW_SCRIPT)


def test_dynamic_scaler_stays_within_its_bounds():
    scaler = LossScaler("dynamic", init_scale=4.0, growth_interval=1, min_scale=1.0, max_scale=16.0)
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 1.0
    for _ in range(10):
        scaler.update(False)
    assert scaler.scale == 16.0


def test_static_and_none_scalers():
    static = LossScaler("static")
    grads = {"g": np.array([512.0, -256.0], np.float32)}
    assert static.scale == 256.0
    assert static.unscale(grads)
    assert grads["g"].tolist() == [2.0, -1.0]
    static.update(True)
    static.update(False)
    assert static.scale == 256.0 and static.skipped_steps == 1

    none = LossScaler("none", init_scale=1024.0)
    grads = {"g": np.array([3.0, np.nan], np.float32)}
    assert none.scale == 1.0
    assert not none.unscale(grads)
    assert grads["g"][0] == 3.0


def test_scaler_rejects_bad_settings_and_fp16_gradients():
    with pytest.raises(SettingsError, match="'adaptive'"):
        LossScaler("adaptive")
    with pytest.raises(SettingsError, match="backoff_factor"):
        LossScaler(backoff_factor=1.0)
    with pytest.raises(SettingsError, match="init_scale"):
        LossScaler(init_scale=2.0**30)
    with pytest.raises(SettingsError, match="growth_interval"):
        LossScaler(growth_interval=0)
    with pytest.raises(BindingError, match="float16"):
        LossScaler().unscale({"g": np.ones(3, np.float16)})
    with pytest.raises(SettingsError, match="missing keys \\['skipped_steps'\\]"):
        state = LossScaler().state_dict()
        del state["skipped_steps"]
        LossScaler().load_state_dict(state)


def snapshot(optimizer: AdamW):
    return {n: p.copy() for n, p in optimizer.params.items()}, optimizer.state_dict()


def assert_unchanged(optimizer: AdamW, before) -> None:
    weights, state = before
    assert all(np.array_equal(optimizer.params[n], weights[n]) for n in weights)
    after = optimizer.state_dict()
    assert all(np.array_equal(after[k], state[k]) for k in state)


def test_guarded_step_matches_torch_unscale_clip_adamw():
    """Gradients scaled by 256 (as the ANE backward sees them), through guarded_step, versus torch doing the
    documented recipe: unscale, clip_grad_norm_(1.0), AdamW."""
    params = random_params(12)
    optimizer = AdamW({n: p.copy() for n, p in params.items()}, lr=1e-3)
    tensors, reference = torch_adamw(params, optimizer.decay_names, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    scaler = LossScaler("static", init_scale=256.0)
    rng = np.random.default_rng(13)
    for step in range(6):
        grads = random_grads(rng)
        lr = cosine_lr(step + 1, max_lr=1e-3, warmup_steps=2, total_steps=6)
        for name, t in tensors.items():
            t.grad = torch.from_numpy(grads[name].copy())
        norm = float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0))
        for group in reference.param_groups:
            group["lr"] = lr
        reference.step()

        report = guarded_step(optimizer, scaler, {n: g * 256 for n, g in grads.items()}, max_norm=1.0, lr=lr)
        assert not report.skipped and report.scale == 256.0 and report.lr == lr
        assert report.grad_norm == pytest.approx(norm, rel=1e-6)
        assert_close_to_torch(optimizer, tensors, reference)


def test_guarded_step_equals_plain_step_bitwise():
    """The guarded path computes aside and swaps buffers; it must give exactly what step() gives."""
    plain, guarded = AdamW(random_params(14)), AdamW(random_params(14))
    scaler = LossScaler("none")
    rng = np.random.default_rng(15)
    for _ in range(4):
        grads = random_grads(rng)
        plain.step({n: g.copy() for n, g in grads.items()}, lr=2e-3)
        assert not guarded_step(guarded, scaler, grads, max_norm=math.inf, lr=2e-3).skipped
    assert_unchanged(guarded, snapshot(plain))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_guarded_step_skips_non_finite_gradients(bad):
    optimizer = AdamW(random_params(16))
    twin = AdamW(random_params(16))
    scaler = LossScaler("dynamic", init_scale=1024.0)
    rng = np.random.default_rng(17)
    first = random_grads(rng)
    guarded_step(optimizer, scaler, {n: g.copy() for n, g in first.items()}, max_norm=1.0, lr=1e-3)
    guarded_step(twin, LossScaler("dynamic", init_scale=1024.0), first, max_norm=1.0, lr=1e-3)
    before = snapshot(optimizer)

    poisoned = random_grads(rng)
    poisoned["attn.b"][7] = bad
    report = guarded_step(optimizer, scaler, poisoned, max_norm=1.0, lr=1e-3)
    assert report.skipped and math.isnan(report.grad_norm) and report.scale == 1024.0
    assert_unchanged(optimizer, before)
    assert optimizer.step_count == 1
    assert scaler.skipped_steps == 1 and scaler.scale == 512.0

    # The next good step continues as if the bad one never happened.
    good = random_grads(rng)
    assert not guarded_step(optimizer, scaler, {n: g * 512 for n, g in good.items()}, max_norm=1.0, lr=1e-3).skipped
    clip_grad_norm(good, 1.0)
    twin.step(good, lr=1e-3)
    assert_unchanged(optimizer, snapshot(twin))


def test_guarded_step_refuses_an_update_that_would_overflow_the_weights():
    """Finite gradients can still push a weight past float32's range (here: a huge lr on a huge weight); the step
    must then change nothing and count as skipped."""
    params = {"w": np.array([3.0e38, 1.0], np.float32), "b": np.array([0.5], np.float32)}
    optimizer = AdamW(params, lr=1e-3)
    scaler = LossScaler("static")
    grads = {"w": np.array([-1.0, 1.0], np.float32) * 256, "b": np.array([1.0], np.float32) * 256}
    before = snapshot(optimizer)
    report = guarded_step(optimizer, scaler, grads, max_norm=10.0, lr=1e38)
    assert report.skipped and report.grad_norm == pytest.approx(math.sqrt(3.0))
    assert_unchanged(optimizer, before)
    assert optimizer.step_count == 0 and scaler.skipped_steps == 1
    assert np.isfinite(optimizer.params["w"]).all()


def test_guarded_step_checks_names_before_touching_gradients():
    optimizer = AdamW(random_params(18))
    grads = random_grads(np.random.default_rng(19))
    del grads["head"]
    kept = {n: g.copy() for n, g in grads.items()}
    with pytest.raises(OrionError, match="missing \\['head'\\]"):
        guarded_step(optimizer, LossScaler(), grads, max_norm=1.0, lr=1e-3)
    assert all(np.array_equal(grads[n], kept[n]) for n in grads)


def test_updates_in_pieces_give_the_bits_of_whole_array_passes(monkeypatch):
    """AdamW and unscaling run over pieces of each parameter, in cache; pieces of 7 elements (every parameter spans
    several, with a short last one) give bit for bit the update of pieces larger than any parameter, through
    step() and guarded_step(); a NaN in a parameter's last piece still refuses the whole step."""
    import orion.train.optim as optim

    rng = np.random.default_rng(21)
    grads = [random_grads(rng) for _ in range(3)]

    def train(piece: int):
        monkeypatch.setattr(optim, "_PIECE", piece)
        plain, guarded = AdamW(random_params(20)), AdamW(random_params(20))
        scaler = LossScaler("static", init_scale=64.0)
        for g in grads:
            plain.step({n: a.copy() for n, a in g.items()}, lr=2e-3)
            assert not guarded_step(guarded, scaler, {n: a * 64 for n, a in g.items()}, max_norm=1.0, lr=2e-3).skipped
        return plain, guarded, scaler

    small, whole = train(7), train(1 << 20)
    for ours, theirs in zip(small[:2], whole[:2]):
        assert_unchanged(ours, snapshot(theirs))
    monkeypatch.setattr(optim, "_PIECE", 7)
    guarded, scaler = small[1], small[2]
    before = snapshot(guarded)
    poisoned = random_grads(rng)
    poisoned["head"].reshape(-1)[-1] = np.nan
    assert guarded_step(guarded, scaler, poisoned, max_norm=1.0, lr=2e-3).skipped
    assert_unchanged(guarded, before)
