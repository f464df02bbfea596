"""The runtime's program life on the emulator backend: binding, caching, the compile budget, every weight-update
strategy against a fresh compile, ANE failure modes, cleanup and threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.compiler.targets import get_target
from orion.errors import BackendError, BindingError, CompileBudgetExceeded, EvaluationError, SettingsError
from orion.ir.builder import GraphBuilder
from orion.runtime.backends.ane import AneBackend
from orion.runtime.backends.emulator import EmulatorBackend, load_program
from orion.runtime.backends.numerics import Numerics
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from orion.runtime.program import Program, backends_that_ran, get_backend
from orion.runtime.tensor import Surface

D, S = 32, 32


def two_layer_graph(seed: int = 0):
    """Two linear layers and a residual; inputs deliberately declared in non-alphabetical order."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("two")
    x = b.input("x", (1, D, 1, S))
    gate = b.input("a_gate", (1, D, 1, S))
    h = b.silu(b.linear(x, rng.normal(0, 0.2, (D, D)), rng.normal(0, 0.1, D), name="fc1"))
    y = b.linear(b.mul(h, gate), rng.normal(0, 0.2, (D, D)), name="fc2")
    b.output("y", b.add(x, y))
    b.output("h", h)
    return b.graph


@pytest.fixture
def cache(tmp_path):
    return ProgramCache(tmp_path / "cache")


@pytest.fixture
def feed(rng):
    return {"x": rng.normal(0, 1, (1, D, 1, S)), "a_gate": rng.normal(0, 1, (1, D, 1, S))}


def fresh_outputs(graph, feed, tmp_path):
    """The reference: emit the graph, write it, and run the text on the emulator directly."""
    result = compile_graph(graph, "default")
    result.module.write(tmp_path / "fresh")
    return load_program(tmp_path / "fresh").run(feed)


def test_program_runs_like_the_emulated_text(tmp_path, cache, feed):
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=cache) as p:
        assert p.input_names == ["a_gate", "x"]  # alphabetical: the ANE's binding order
        assert p.plan.input_surface_bytes == p.plan.output_surface_bytes == get_target("default").min_surface_bytes
        out = p.run(feed)
    ref = fresh_outputs(two_layer_graph(), feed, tmp_path)
    assert out.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


def test_cache_hit_skips_the_compile_and_survives_a_new_cache_object(tmp_path, feed):
    budget = CompileBudget(10)
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=ProgramCache(tmp_path / "c"),
                            budget=budget) as p1:
        first = p1.run(feed)
    assert (p1.compiles, p1.cache_hits, budget.used) == (1, 0, 1)
    second_cache = ProgramCache(tmp_path / "c")  # what a second process sees: only the disk
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=second_cache, budget=budget) as p2:
        np.testing.assert_array_equal(p2.run(feed)["y"], first["y"])
    assert (p2.compiles, p2.cache_hits, budget.used) == (0, 1, 1)
    # different weights, same text: the cached compile is reused and the outputs follow the new weights
    with Program.from_graph(two_layer_graph(seed=5), backend="emulator", cache=second_cache, budget=budget) as p3:
        out3 = p3.run(feed)
    np.testing.assert_array_equal(out3["y"], fresh_outputs(two_layer_graph(seed=5), feed, tmp_path)["y"])
    assert budget.used == 1


@pytest.mark.parametrize("strategy", ["reload", "patch", "recompile"])
def test_baked_weight_updates_equal_a_fresh_compile(tmp_path, cache, feed, strategy):
    budget = CompileBudget(10)
    new_graph = two_layer_graph(seed=7)
    new_weights = {n.name: n.attrs["val"] for n in new_graph.nodes if n.is_const and n.name.startswith("fc")}
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=cache, budget=budget) as p:
        before = p.run(feed)
        p.update_weights(new_weights, strategy=strategy)
        after = p.run(feed)
    ref = fresh_outputs(new_graph, feed, tmp_path)
    assert not np.array_equal(before["y"], ref["y"])
    for k in ref:
        np.testing.assert_array_equal(after[k], ref[k], err_msg=f"{strategy}: {k}")
    assert budget.used == (2 if strategy == "recompile" else 1)


def test_weights_as_inputs_update_without_any_compile(tmp_path, cache, feed):
    budget = CompileBudget(10)
    names = ["fc1_weight", "fc2_weight", "fc1_bias"]
    new_graph = two_layer_graph(seed=3)
    new_weights = {n.name: n.attrs["val"] for n in new_graph.nodes if n.name in names}
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=cache, budget=budget,
                            weights_as_inputs=names) as p:
        assert p.input_names == ["a_gate", "x"]
        assert "fc1_weight" in p.weight_names()
        before = p.run(feed)
        used = budget.used
        p.update_weights(new_weights)
        after = p.run(feed)
        assert budget.used == used  # no compile
    ref_old, ref_new = fresh_outputs(two_layer_graph(), feed, tmp_path), fresh_outputs(new_graph, feed, tmp_path)
    # a matmul instead of a conv: same products, same accumulator, so equal up to fp16 rounding of the layout
    np.testing.assert_allclose(before["y"].astype(np.float32), ref_old["y"].astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(after["y"].astype(np.float32), ref_new["y"].astype(np.float32), atol=2e-2)
    assert not np.allclose(before["y"].astype(np.float32), after["y"].astype(np.float32), atol=0.1)


def test_compile_budget_is_never_silently_exceeded(tmp_path, feed):
    budget = CompileBudget(1)
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=ProgramCache(None), budget=budget) as p:
        p.run(feed)
        with pytest.raises(CompileBudgetExceeded, match="budget of 1.*restart the process"):
            p.update_weights({"fc2_weight": np.zeros((D, D, 1, 1))}, strategy="recompile")


def test_emulator_refuses_what_the_ane_refuses(tmp_path):
    result = compile_graph(two_layer_graph(), "default")
    result.module.write(tmp_path / "m")
    backend = EmulatorBackend(get_target("default"), root=tmp_path / "models")
    files = {rel: tmp_path / "m" / rel for rel in result.module.weight_files}
    model = backend.new_model(result.module.text, files)
    model.compile()
    model.load()
    size = get_target("default").min_surface_bytes
    good = [Surface(size), Surface(size)]
    model.evaluate(good, [Surface(size), Surface(size)])
    with pytest.raises(EvaluationError, match="unequal sizes") as info:
        model.evaluate([Surface(size), Surface(size + 64)], [Surface(size), Surface(size)])
    assert info.value.status == 0x1D
    with pytest.raises(EvaluationError, match="needs >= 49152") as info:
        model.evaluate([Surface(4096), Surface(4096)], [Surface(size), Surface(size)])
    assert info.value.status == 0x1D
    model.release()
    assert not model.directory.exists()


def test_stale_weights_after_a_reload_that_only_overwrites_files(tmp_path, feed):
    """ANE-07: weights are baked at compile time; overwriting the weight files and reloading is not enough."""
    old, new = compile_graph(two_layer_graph(), "default"), compile_graph(two_layer_graph(seed=9), "default")
    old.module.write(tmp_path / "old")
    new.module.write(tmp_path / "new")
    backend = EmulatorBackend(get_target("default"), root=tmp_path / "models")
    model = backend.new_model(old.module.text, {r: tmp_path / "old" / r for r in old.module.weight_files})
    model.compile()
    size = get_target("default").min_surface_bytes
    outs = [Surface(size), Surface(size)]
    ins = [Surface(size), Surface(size)]
    for surface in ins:
        with surface.lock() as raw:
            raw.view(np.float16)[:] = 0.5

    def run():
        model.load()
        model.evaluate(ins, outs)
        with outs[1].lock() as raw:
            return raw.copy()

    stale_before = run()
    model.unload()
    for rel in new.module.weight_files:  # Orion's first recipe: overwrite the files, unload, load
        (model.directory / rel).write_bytes((tmp_path / "new" / rel).read_bytes())
    np.testing.assert_array_equal(run(), stale_before)
    model.unload()
    model.write_weights({r: tmp_path / "new" / r for r in new.module.weight_files})  # also refresh the snapshot
    assert not np.array_equal(run(), stale_before)
    model.release()


def test_binding_errors_name_inputs_and_cleanup_removes_directories(cache, feed):
    p = Program.from_graph(two_layer_graph(), backend="emulator", cache=cache)
    with pytest.raises(BindingError, match=r"missing input\(s\) \['a_gate'\]"):
        p.run({"x": feed["x"]})
    with pytest.raises(BindingError, match="input 'x'.*shape"):
        p.run({"x": np.zeros((1, D, 1, S + 1)), "a_gate": feed["a_gate"]})
    with pytest.raises(BindingError, match="no weight named 'nope'"):
        p.update_weights({"nope": np.zeros(3)})
    directory, stage = p.load()._model.directory, p._stage
    assert directory.exists() and stage.exists()
    p.close()
    p.close()
    assert not directory.exists() and not stage.exists()


def test_concurrent_runs_from_threads_give_the_right_answers(cache, rng):
    feeds = [{"x": rng.normal(0, 1, (1, D, 1, S)), "a_gate": rng.normal(0, 1, (1, D, 1, S))} for _ in range(8)]
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=cache) as p:
        expected = [p.run(f)["y"] for f in feeds]
        results: list = [None] * len(feeds)

        def work(i):
            for _ in range(3):
                results[i] = p.run(feeds[i])["y"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(feeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_a_cached_compile_the_backend_cannot_reuse_falls_back_to_compiling(tmp_path, feed, monkeypatch):
    from orion.errors import BackendError
    from orion.runtime.backends.emulator import EmulatorModel

    cache = ProgramCache(tmp_path / "c")
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=cache) as p1:
        expected = p1.run(feed)

    def refuse(self, artifacts):
        raise BackendError("cannot rebuild the compiled data for several weight files")

    monkeypatch.setattr(EmulatorModel, "install_artifacts", refuse)
    with Program.from_graph(two_layer_graph(), backend="emulator", cache=cache) as p2:
        np.testing.assert_array_equal(p2.run(feed)["y"], expected["y"])
    assert (p2.cache_hits, p2.compiles) == (0, 1)


# --- which backend runs: asked for, resolved, reported ------------------------------------------------------------

no_ane_here = pytest.mark.skipif(AneBackend.available(), reason="checks a machine without an ANE")


@no_ane_here
def test_auto_is_the_emulator_here_and_ane_is_an_error_naming_why():
    assert get_backend("auto").name == "emulator"
    with pytest.raises(BackendError, match=r"^backend 'ane': the ANE backend needs macOS on Apple silicon.*\(this is "):
        get_backend("ane")


@no_ane_here
def test_orion_backend_decides_what_auto_means(monkeypatch):
    monkeypatch.setenv("ORION_BACKEND", "ane")
    with pytest.raises(BackendError, match=r"^ORION_BACKEND='ane': the ANE backend needs macOS on Apple silicon"):
        get_backend("auto")
    assert get_backend("emulator").name == "emulator"  # an explicit choice is not overridden
    monkeypatch.setenv("ORION_BACKEND", "emulator")
    assert get_backend("auto").name == "emulator"
    monkeypatch.setenv("ORION_BACKEND", "gpu")
    with pytest.raises(SettingsError, match=r"unknown ORION_BACKEND='gpu'; choose one of auto, ane, emulator"):
        get_backend("auto")


def test_the_reported_backend_is_the_one_that_ran_programs(tmp_path, feed):
    """A program a backend refuses is an error, never a run elsewhere: it reports no backend; one that ran reports
    the backend that executed it, whatever was asked for."""

    class RefusingAne(EmulatorBackend):
        name = "ane"

        def new_model(self, mil_text, weight_files):
            model = super().new_model(mil_text, weight_files)

            def refuse():
                raise BackendError("the ANE compiler refused the program: InvalidMILProgram")

            model.compile = refuse
            return model

    refused = Program.from_graph(two_layer_graph(), backend=RefusingAne(get_target("default"), root=tmp_path / "a"),
                                 cache=ProgramCache(None))
    with pytest.raises(BackendError, match="InvalidMILProgram"):
        refused.run(feed)
    assert refused.evaluations == 0 and backends_that_ran([refused]) == "none"
    refused.close()
    with Program.from_graph(two_layer_graph(), backend="auto", cache=ProgramCache(None)) as p:
        idle = Program.from_graph(two_layer_graph(seed=1), backend=RefusingAne(get_target("default"),
                                                                                root=tmp_path / "b"))
        assert backends_that_ran([p, idle]) == "none"
        p.run(feed)
        assert backends_that_ran([p, idle]) == p.backend.name
        idle.close()


@pytest.mark.parametrize("strategy", ["reload", "patch", "recompile"])
def test_large_weights_stay_in_the_staged_files_not_in_memory(tmp_path, cache, rng, strategy):
    """A program's weights are written once to its staging folder and held as maps of those files (its backend
    reads the files): before and after a baked update, they read as the values the program runs."""
    from orion.mil.emit import MAPPED_BYTES

    def graph(seed):
        w = np.random.default_rng(seed).normal(0, 0.05, (256, 256))
        b = GraphBuilder("big")
        b.output("y", b.linear(b.input("x", (1, 256, 1, 16)), w, name="fc"))
        return b.graph, w

    def mapped(p):
        arrays = [a for arrays in p.module.weight_files.values() for a in arrays if a.nbytes >= MAPPED_BYTES]
        assert arrays
        for a in arrays:
            while a is not None and not isinstance(a, np.memmap):
                a = a.base
            assert a is not None and Path(a.filename).is_relative_to(p._stage)
        return arrays

    x = {"x": rng.normal(0, 1, (1, 256, 1, 16))}
    (old, _), (new, w_new) = graph(1), graph(2)
    with Program.from_graph(old, backend="emulator", cache=cache) as p:
        mapped(p)
        np.testing.assert_array_equal(p.run(x)["y"], fresh_outputs(old, x, tmp_path / "old")["y"])
        p.update_weights({"fc.weight": w_new}, strategy=strategy)
        assert any(np.array_equal(a.reshape(-1), w_new.astype(np.float16).reshape(-1)) for a in mapped(p))
        np.testing.assert_array_equal(p.run(x)["y"], fresh_outputs(new, x, tmp_path / "new")["y"])


def test_weight_inputs_kept_between_writes_give_the_bits_of_fresh_inputs(cache, rng):
    """The emulator keeps a weight input's converted (and, for a matmul operand, subnormal-flushed) values until its
    surface is written again: every run, before and after updates, equals the same graph fed those values as
    ordinary inputs, converted at each run. Subnormal fp16 values in both weights make a missed flush (the matmul
    operand) or a wrong one (the gain, read by a multiply) show; the fp32 accumulator, because the fixed-point one
    flushes its operands again."""
    b = GraphBuilder("kept")
    x = b.input("x", (1, D, 1, S))
    w = b.input("w", (1, 1, D, D))
    g = b.input("g", (1, D, 1, 1))
    rows = b.matmul(w, b.reshape(x, shape=[1, 1, D, S]), transpose_x=False, transpose_y=False)
    b.output("y", b.add(b.mul(x, g), b.reshape(rows, shape=[1, D, 1, S])))
    x_value = rng.normal(0, 1, (1, D, 1, S)) * 2000

    def weights(seed):
        r = np.random.default_rng(seed)
        w_value, g_value = r.normal(0, 0.02, (1, 1, D, D)), r.normal(1, 0.1, (1, D, 1, 1))
        w_value[0, 0, :2] = 5e-5  # fp16 subnormals: a matmul flushes them (N9), a multiply does not; the rows of
        g_value[0, :2] = 2e-6  # the output they give are only those products
        return {"w": w_value, "g": g_value}

    emulator = EmulatorBackend(get_target("default"), Numerics(accumulator="fp32"))  # the models' (and training's)
    with Program.from_graph(b.graph, backend=emulator, cache=cache, weights_as_inputs=["w", "g"]) as kept, \
            Program.from_graph(b.graph, backend=emulator, cache=cache) as fresh:
        assert kept.input_tensor("w").surface.resident and not fresh.input_tensor("w").surface.resident
        for seed in (1, 1, 2, 2):  # the second run of each reads what the first kept
            kept.update_weights(weights(seed))
            for _ in range(2):
                got, want = kept.run({"x": x_value}), fresh.run({"x": x_value, **weights(seed)})
                np.testing.assert_array_equal(got["y"], want["y"])
        with kept.input_tensor("w").view() as view:  # a write through the view is a write too
            view[0, 0, 0, 0] = 7.0
        changed = weights(2)
        changed["w"][0, 0, 0, 0] = 7.0
        np.testing.assert_array_equal(kept.run({"x": x_value})["y"], fresh.run({"x": x_value, **changed})["y"])
