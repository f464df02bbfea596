"""``orion bench gpt2``'s interleaved repetitions: the order they run in, the medians and ratios reported, and the
warning when the pairs spread too wide to trust a ratio."""

from __future__ import annotations

import statistics
import sys

import numpy as np
import pytest

from orion.models import bench


class FakeSide:
    def __init__(self, name: str, log: list[str], values: list[float]):
        self.name, self.log, self.values = name, log, iter(values)

    def repetition(self) -> dict:
        self.log.append(self.name)
        return {"decode_tok_s": next(self.values)}


def test_repetitions_alternate_which_side_goes_first():
    log: list[str] = []
    sides = [FakeSide("A", log, [1, 2, 3, 4]), FakeSide("B", log, [5, 6, 7, 8])]
    reps = bench.interleave([side.repetition for side in sides], 4)
    assert log == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [[r["decode_tok_s"] for r in side] for side in reps] == [[1, 2, 3, 4], [5, 6, 7, 8]]


def reps(decode: list[float], prefill: list[float]) -> list[dict]:
    return [{"decode_tok_s": d, "prefill_tok_s": p} for d, p in zip(decode, prefill)]


def test_ratios_are_medians_of_pairs_and_warn_only_when_the_pairs_spread():
    orion = reps([10.0, 30.0, 12.0], [100.0, 101.0, 99.0])
    reference = reps([20.0, 30.0, 40.0], [50.0, 50.0, 50.0])
    out, warnings = bench.ratios(orion, reference)
    # pairs 0.5, 1.0, 0.3: their median, not the ratio of the medians (12 / 30 = 0.4); quartiles 0.4 and 0.75
    assert out["decode"] == pytest.approx(0.5)
    assert out["decode_spread"] == pytest.approx((0.75 - 0.4) / 0.5)
    assert out["prefill"] == pytest.approx(2.0)
    assert out["prefill_spread"] == pytest.approx((2.01 - 1.99) / 2.0)
    assert len(warnings) == 1 and warnings[0].startswith("decode ratio") and "70%" in warnings[0]


def test_bench_gpt2_against_transformers_reports_medians_of_interleaved_repetitions(tiny_gpt2_dir):
    """With one thread per side: the cap set in each side's process."""
    pytest.importorskip("torch")
    report = bench.bench_gpt2(str(tiny_gpt2_dir), "emulator", "transformers", 8, 3, repeats=3, threads=1)
    assert report["repeats"] == 3 and report["threads"] == 1
    assert report["reference"]["torch_threads"] == 1  # the cap reached the side's process
    for side in ("orion", "reference"):
        r = report[side]
        assert len(r["repetitions"]) == 3 and r["peak_mb"] > 0
        for key in ("decode_tok_s", "prefill_tok_s", "cached_prefill_s"):
            values = [rep[key] for rep in r["repetitions"]]
            assert r[key] == statistics.median(values) > 0
            q1, _, q3 = np.percentile(values, [25, 50, 75])
            assert r[f"{key}_spread"] == pytest.approx((q3 - q1) / r[key])
    assert report["orion"]["backend"] == "emulator"
    want, warnings = bench.ratios(report["orion"]["repetitions"], report["reference"]["repetitions"])
    assert report["ratios"] == want and report["warnings"] == warnings


def test_bench_llama_measures_the_classifier_on_the_cpu_and_on_the_ane(tmp_path):
    """Random weights of a preset's size (tiny here), Orion with the classifier in each place; the ANE one adds its
    program to the dispatches, and the report names the faster."""
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from orion.cli.main import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "llama", "--preset", "tiny", "--reference", "none", "--prompt-tokens",
                                      "8", "--new-tokens", "3", "--repeats", "1", "--backend", "emulator",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(out.read_text())
    cpu, ane = report["orion"], report["orion_ane_head"]
    assert (cpu["head"], ane["head"]) == ("cpu", "ane") and report["model"] == "random tiny"
    assert ane["dispatches_per_token"] == cpu["dispatches_per_token"] + 1  # 512 entries: one classifier program
    fastest = max((cpu["decode_tok_s"], "cpu"), (ane["decode_tok_s"], "ane"))[1]
    assert report["faster_head"] == fastest and f"classifier on the {fastest}" in result.stdout


def test_bench_llama_refuses_an_unknown_preset():
    with pytest.raises(Exception, match="no preset 'qwen9'; presets: smollm2-135m"):
        bench.bench_llama(None, "qwen9", "emulator", None, 8, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent's peak carries over on Linux")
def test_a_side_reports_its_own_peak_not_its_parents():
    """A side's process reports its own peak memory, not the memory its parent held when it started the side (Linux's
    ru_maxrss keeps that across execve): here the parent holds 400 MB more than the child ever does."""
    import os
    import subprocess

    held = np.ones(400 * 2**20 // 8)  # touched: in this process's RSS when the child starts
    code = "from orion.models.bench import _peak_mb; print(_peak_mb())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env=env).stdout)
    assert 5 < child < 200 and held.sum() == held.size
    assert bench._peak_mb() > 400


def test_an_orion_side_leaves_no_staged_weights_behind(tmp_path):
    """A side's programs stage their weight files in the temporary folder; they go when the side exits (a benchmark
    of a 135M model left 800 MB there per run)."""
    import os
    import subprocess

    pytest.importorskip("transformers")
    folder = bench.make_random_llama(tmp_path / "model", "tiny")
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(temp)}
    side = subprocess.run([sys.executable, "-m", "orion.models.bench", "--side", "orion", "--model", str(folder),
                           "--prompt-tokens", "4", "--new-tokens", "2", "--backend", "emulator"], input="run\n",
                          capture_output=True, text=True, env=env, check=True)
    assert side.stdout.count(bench.MARK) == 3 and '"peak_mb"' in side.stdout
    assert list(temp.iterdir()) == []
