"""Whole jobs on ``backend="ane"`` through the real bridge and the stand-in of the frameworks give exactly the
emulator backend's outputs: the compiler's example through `orion compile`/`orion run`, GPT-2 generation, a training
step, a LoRA swap, and the `orion doctor` probes. The stand-in's chip is the emulator, so any difference is the
bridge's: a wrong binding, a stale weight, a lost update, a leak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import orion
from orion.cli.main import cli
from orion.models import model_backend
from orion.runtime.cache import ProgramCache

ROOT = Path(__file__).resolve().parents[2]
FP32_ACCUMULATOR = json.dumps({"accumulator": "fp32"})  # what model programs use on the emulator (MODEL_ACCUMULATOR)


@pytest.fixture
def model_chip(ane_standin, monkeypatch):
    """The stand-in's chip with the accumulator the emulator backend uses for models."""
    monkeypatch.setenv("ORION_STANDIN_NUMERICS", FP32_ACCUMULATOR)
    return ane_standin


@pytest.mark.parametrize("target", ["default", "m1"])
def test_the_compiler_example_runs_alike(ane_standin, tmp_path, monkeypatch, target):
    monkeypatch.setenv("ORION_STANDIN_TARGET", target)  # the stand-in's chip is the one the profile describes
    env = {"ORION_D": "64", "ORION_HEADS": "4", "ORION_SEQ": "64"}
    runner = CliRunner()
    compiled = runner.invoke(cli, ["compile", str(ROOT / "examples" / "transformer_block.py"), "--out",
                                   str(tmp_path / "block"), "--target", target], env=env)
    assert compiled.exit_code == 0, compiled.output
    outputs = {}
    for backend in ("emulator", "ane"):
        out = tmp_path / f"{backend}.npz"
        result = runner.invoke(cli, ["run", str(tmp_path / "block"), "--random-inputs", "3", "--out", str(out),
                                     "--backend", backend, "--target", target])
        assert result.exit_code == 0, result.output
        assert f"ran on {backend}" in result.output
        with np.load(out) as got:
            outputs[backend] = got["y"]
    assert np.abs(outputs["emulator"]).max() > 0.1
    np.testing.assert_array_equal(outputs["ane"], outputs["emulator"])
    assert ane_standin.failures() == 0


def test_gpt2_generates_the_same_text_and_logits(model_chip, tiny_gpt2_dir):
    results = {}
    for backend in ("emulator", "ane"):
        with orion.load(str(tiny_gpt2_dir), backend=backend, cache=ProgramCache(None)) as model:
            ids = model.tokenizer.encode("The cat sat on the mat")
            results[backend] = (model.generate("Once upon a time", max_tokens=10, temperature=0.8, seed=3),
                                model.logits(ids))
    assert results["ane"][0] == results["emulator"][0]
    np.testing.assert_array_equal(results["ane"][1], results["emulator"][1])
    assert model_chip.failures() == 0


def test_the_gpt2_benchmark_names_the_chip_and_target_it_ran_for(model_chip, tiny_gpt2_dir, monkeypatch):
    from orion.models.bench import bench_gpt2

    monkeypatch.setenv("ORION_STANDIN_TARGET", "m1")
    report = bench_gpt2(str(tiny_gpt2_dir), "ane", None, prompt_tokens=8, new_tokens=2, target="m1")
    assert report["orion"]["backend"] == "ane" and report["target"] == "m1"
    assert report["chip"] == "Apple M4 (Orion stand-in)" and report["os_build"] == "25A000-standin", report
    assert model_chip.failures() == 0


def test_a_training_step_gives_the_same_loss_and_weights(model_chip, tmp_path):
    from orion.train.checkpoint import latest_checkpoint, load_checkpoint
    from orion.train.corpus import make_story_corpus, write_corpus
    from orion.train.trainer import Trainer, TrainSettings

    corpus = tmp_path / "stories.txt"
    write_corpus(corpus, make_story_corpus(60, seed=0))
    finals = {}
    for backend in ("emulator", "ane"):
        settings = TrainSettings(preset="tiny", data=str(corpus), out=str(tmp_path / backend), steps=2, batch=2,
                                 seq_len=32, lr=1e-2, warmup=1, save_every=2, seed=0)
        Trainer(settings, backend=model_backend(backend), target="default", cache=ProgramCache(None)).run()
        weights, moments, _ = load_checkpoint(latest_checkpoint(tmp_path / backend))
        losses = [json.loads(line)["loss"] for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        finals[backend] = (weights, moments, losses)
    weights, moments, losses = finals["ane"]
    assert losses == finals["emulator"][2] and len(losses) == 2
    for name, value in finals["emulator"][0].items():
        assert weights[name].tobytes() == value.tobytes(), name
    for name, value in finals["emulator"][1].items():
        assert moments[name].tobytes() == value.tobytes(), name
    assert model_chip.failures() == 0


def test_a_lora_swap_gives_the_same_logits_and_compiles_nothing(model_chip, tiny_gpt2_dir, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    base = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                             fan_in_fan_out=True)  # GPT-2 keeps Conv1D weights as [in, out]
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    logits = {}
    for backend in ("emulator", "ane"):
        with orion.load(str(tiny_gpt2_dir), backend=backend, cache=ProgramCache(None)) as model:
            ids = model.tokenizer.encode("The moon and the fox")
            plain = model.logits(ids)
            model.load_adapter(tmp_path / "adapter", name="a")
            model.set_adapter("a")  # the first adapter builds the programs that take adapters as inputs
            adapted = model.logits(ids)
            compiles = model_chip.compiles()
            model.set_adapter(None)
            back = model.logits(ids)
            model.set_adapter("a")
            logits[backend] = (plain, adapted, back, model.logits(ids))
            if backend == "ane":
                assert model_chip.compiles() == compiles  # a swap writes inputs: no compile
    plain, adapted, back, again = logits["ane"]
    assert np.abs(adapted - plain).max() > 0.01  # the adapter matters
    np.testing.assert_array_equal(back, plain)  # back to the base, bit for bit
    np.testing.assert_array_equal(again, adapted)
    for got, want in zip(logits["ane"], logits["emulator"]):
        np.testing.assert_array_equal(got, want)
    assert model_chip.failures() == 0


#: Probes whose ANE runs cover each path of the bridge: a compile the chip rejects, binding, a refused evaluation,
#: the patch recipe (artifacts into a new model), LoRA inputs. The slow test runs them all.
DOCTOR_PROBES = ["concat-interleave", "binding-order-outputs", "unequal-surfaces", "weight-update-patch",
                 "lora-inputs", "multi-function", "compressed-weights"]


def _doctor_agrees(probes) -> None:
    from orion.runtime.doctor import run_doctor

    report = run_doctor("auto", probes=probes, timeout=120)
    assert report["backends"] == ["ane", "emulator"] and report["chip"] == "Apple M4 (Orion stand-in)"
    assert len(report["probes"]) == len(probes or report["probes"])
    for entry in report["probes"]:
        assert entry["ane"]["status"] == "ok", (entry["id"], entry["ane"].get("error"), entry["ane"].get("stderr"))
        if entry["id"] == "numerics-ties":
            _round_refused_by_the_standin(entry)
            continue
        comparison = entry["comparison"]
        assert comparison["verdict_equal"] and comparison["value_equal"], (entry["id"], entry["ane"]["verdict"],
                                                                            entry["emulator"]["verdict"])
        assert comparison["outputs_equal"] in (True, None), (entry["id"], comparison)


def test_doctor_probes_on_the_ane_agree_with_the_emulator(ane_standin):
    _doctor_agrees(DOCTOR_PROBES)


def _round_refused_by_the_standin(entry) -> None:
    """The stand-in's compiler refuses ops nobody has seen run on the ANE (ANE-34), so the ties probe's ``round``
    program does not compile there while the emulator runs it: the doctor reports exactly that disagreement, and
    the ties of add, reduce_sum and matmul still agree."""
    ane, emulator = entry["ane"], entry["emulator"]
    refused = ane["observations"]["round"]
    assert refused["stage"] == "compile" and "ANE-34" in refused["error"] and "round" in refused["error"]
    assert emulator["observations"]["round"]["works"] and not entry["comparison"]["verdict_equal"]
    assert emulator["verdict"] == ane["verdict"] + ", round half-away"


@pytest.mark.slow
def test_every_doctor_probe_on_the_ane_agrees_with_the_emulator(ane_standin):
    _doctor_agrees(None)


def test_each_function_of_a_multifunction_program_runs_by_its_procedure_index(ane_standin, tmp_path, monkeypatch):
    """On a chip whose profile says programs of several functions run by procedureIndex, the multi-function probe's
    ANE run (the bridge's request with index 1 for decode) gives each function's outputs, as the emulator does."""
    import json

    from orion.runtime.doctor import run_doctor

    profile = tmp_path / "multi.json"
    profile.write_text(json.dumps({"base": "default", "overrides": {"multi_function": "procedure-index"}}))
    monkeypatch.setenv("ORION_STANDIN_TARGET", str(profile))
    report = run_doctor("auto", probes=["multi-function"], timeout=120, target=str(profile))
    entry = report["probes"][0]
    assert entry["ane"]["status"] == "ok", entry["ane"]
    assert entry["ane"]["value"] == {"multi_function": "procedure-index"} == entry["emulator"]["value"]
    assert entry["comparison"]["verdict_equal"] and entry["comparison"]["outputs_equal"] in (True, None)
    assert ane_standin.failures() == 0
