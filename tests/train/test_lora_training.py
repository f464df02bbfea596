"""Training a LoRA adapter on a frozen base: the adapter's gradients against torch autograd through peft's LoRA
layers on transformers' LlamaForCausalLM; a run's per-step losses follow peft + torch training the same adapter on
the same batches; the base stays untouched and checkpoints are PEFT adapters peft loads with Orion's logits; resume
is bitwise exact; the CLI trains, exports and generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import orion
from orion.cli.main import cli
from orion.errors import OrionError, SettingsError
from orion.lora import LoraLayout, new_adapter
from orion.models import model_backend, read_llama
from orion.models.llama import LlamaConfig, adapter_spec, export_hf
from orion.runtime.cache import ProgramCache
from orion.train.checkpoint import latest_checkpoint, load_checkpoint
from orion.train.corpus import make_story_corpus, write_corpus
from orion.train.data import BatchStream, tokenizer_files
from orion.train.engine import LlamaEngine
from orion.train.trainer import Trainer, TrainSettings, weights_digest
from tests.conftest import llama_weights
from tests.train.torch_reference import hf_llama, scheduled_lr, torch_training_step

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS = 10


def test_adapter_gradients_match_autograd_through_peft():
    """Every target adapted (rank 4, alpha 8, nonzero B), two layers: the loss and each lora_A/lora_B gradient of
    Orion's engine (fp16 programs, CPU float32 gradients) against peft's LoRA layers under torch autograd. Layer 0's
    gradients flow back through layer 1's adapters in the backward program, so a missing adapter path there shows."""
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=128, max_seq_len=32)
    weights = llama_weights(config, seed=1)
    rng = np.random.default_rng(0)
    spec = adapter_spec(config)
    adapter = new_adapter(spec, "all", rank=4, alpha=8.0, seed=3)
    for m in adapter.modules.values():
        m.b[...] = rng.normal(0, 0.05, m.b.shape)
    ids, targets = rng.integers(0, 128, 32), rng.integers(0, 128, 32)
    scale = 256.0
    engine = LlamaEngine(config, 32, backend=model_backend("emulator"), target="default", cache=ProgramCache(None),
                         lora=LoraLayout.covering([adapter], 32))
    try:
        engine.set_weights(weights)
        engine.set_adapter(adapter)
        params = adapter.to_arrays()
        grads = {k: np.zeros_like(v) for k, v in params.items()}
        loss = engine.loss_and_grads(weights | params, ids, targets, scale, grads, ids.size)
    finally:
        engine.close()

    model = peft_twin(config, weights, adapter, rank=4, alpha=8.0)
    logits = model(torch.from_numpy(ids)[None]).logits[0]
    ref_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets), reduction="sum")
    (ref_loss / ids.size).backward()
    assert loss == pytest.approx(float(ref_loss), rel=1e-4)
    for (layer, target), m in adapter.modules.items():
        module = model.get_submodule(f"base_model.model.{spec.module_key(layer, target)}")
        for which, ref in (("A", module.lora_A["default"].weight.grad), ("B", module.lora_B["default"].weight.grad)):
            ref = ref.numpy()
            got = grads[f"layers.{layer}.{target}.lora_{which}"] / scale
            # measured worst 2.5e-3 of the largest entry (fp16 activations and gradients in the programs)
            assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max(), (layer, target, which)


def peft_twin(config: LlamaConfig, weights: dict[str, np.ndarray], adapter, rank: int, alpha: float):
    """transformers' LlamaForCausalLM with ``weights`` under peft LoRA layers holding ``adapter``'s A and B."""
    spec = adapter_spec(config)
    model = peft.get_peft_model(hf_llama(config, weights), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted({spec.modules[t] for t in adapter.targets})))
    for (layer, target), m in adapter.modules.items():
        module = model.get_submodule(f"base_model.model.{spec.module_key(layer, target)}")
        module.lora_A["default"].weight.data = torch.from_numpy(m.a.copy())
        module.lora_B["default"].weight.data = torch.from_numpy(m.b.copy())
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    write_corpus(path, make_story_corpus(400, seed=0))
    return path


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> Path:
    """A tiny trained Llama exported in Hugging Face layout with its tokenizer: the frozen base."""
    out = tmp_path_factory.mktemp("base")
    run = make_trainer(TrainSettings(preset="tiny", data=str(corpus), out=str(out / "run"), steps=8, batch=2,
                                     seq_len=32, lr=1e-2, warmup=2, save_every=100)).run()
    weights, _, state = load_checkpoint(run["checkpoint"])
    tokenizer = orion.models.hub.Tokenizer.from_dir(Path(run["checkpoint"]))
    return export_hf(weights, LlamaConfig(**state["config"]), out / "hf", tokenizer_files(tokenizer))


def make_trainer(settings: TrainSettings, **kwargs) -> Trainer:
    return Trainer(settings, backend=model_backend("emulator"), target="default", cache=ProgramCache(None),
                   **kwargs)


def lora_settings(corpus: Path, base_model: Path, out: Path, **changes) -> TrainSettings:
    fields = dict(data=str(corpus), out=str(out), steps=STEPS, batch=2, seq_len=32, lr=1e-2, warmup=2, save_every=4,
                  seed=0, base=str(base_model), lora_rank=4, lora_alpha=8.0, lora_targets="q,v,down")
    return TrainSettings(**(fields | changes))


@pytest.fixture(scope="module")
def straight(corpus, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, make_trainer(lora_settings(corpus, base, out)).run()


def torch_lora_losses(trainer: Trainer) -> list[float]:
    """Per-step losses of peft + torch (float32) training the same adapter (same initial A, B = 0) on the same frozen
    base, batches, schedule, clipping and AdamW settings (weight decay on A and B: both are matrices)."""
    s, config = trainer.settings, trainer.config
    adapter = new_adapter(trainer.spec, trainer.lora_targets, s.lora_rank, s.lora_alpha, s.seed)
    model = peft_twin(config, trainer.base_weights, adapter, s.lora_rank, s.lora_alpha)
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps, weight_decay=s.weight_decay,
                                  foreach=False)
    stream = BatchStream(trainer.dataset.train, s.batch, config.max_seq_len, seed=s.seed)
    return [torch_training_step(model, optimizer, *next(stream), scheduled_lr(s, step), s.grad_clip)
            for step in range(1, s.steps + 1)]


@pytest.mark.parametrize("steps, lr, largest_gap", [(STEPS, 3e-2, 0.02),
                                                   pytest.param(150, 1e-2, 0.1, marks=pytest.mark.slow)])
def test_a_lora_run_follows_peft_training_and_its_checkpoint_is_a_peft_adapter(corpus, base, tmp_path, steps, lr,
                                                                               largest_gap):
    """A frozen-adapter run is the control: the adapter must move the loss well past the gap. Measured: 10 steps at
    lr 3e-2, largest per-step gap to peft 0.004 nats while the adapter moves the loss by up to 0.099; 150 steps at
    lr 1e-2 (3e-2 makes both runs spike at random steps), largest gap 0.041, mean 0.0044, the adapter's effect 0.18."""
    trainer = make_trainer(lora_settings(corpus, base, tmp_path / "run", steps=steps, lr=lr, save_every=1000))
    before = weights_digest(trainer.base_weights)
    result = trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = np.array([r["loss"] for r in rows])
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and result["skipped_steps"] == 0
    reference = np.array(torch_lora_losses(trainer))
    frozen = np.array(torch_lora_losses(make_trainer(lora_settings(corpus, base, tmp_path / "frozen", steps=steps,
                                                                   lr=1e-9))))
    gap = np.abs(ours - reference)
    print(f"{steps} steps: largest loss gap to peft {gap.max():.3g} nats (mean {gap.mean():.3g}); the adapter moves "
          f"the loss by up to {np.abs(reference - frozen).max():.3g}")
    assert gap.max() < largest_gap and gap.mean() < 0.01
    assert np.abs(reference - frozen).max() > 0.05
    assert result["compiles"] == 2  # forward and backward with adapter inputs; every other block is a cache hit
    assert weights_digest(read_llama(base)[1]) == before

    weights, moments, state = load_checkpoint(result["checkpoint"])
    assert state["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "down"]}
    assert set(weights) == {f"layers.{i}.{t}.lora_{w}" for i in range(2) for t in ("q", "v", "down") for w in "AB"}
    assert set(moments) == {f"{k}.{n}" for k in "mv" for n in weights} | {"step"}
    assert any(np.abs(weights[f"layers.{i}.{t}.lora_B"]).max() > 0 for i in range(2) for t in ("q", "v", "down"))

    checkpoint = Path(result["checkpoint"])
    ids = np.arange(1, 30)
    with orion.load(str(checkpoint), backend="emulator") as model:  # the base with the adapter active
        ours = model.logits(ids)
        model.set_adapter(None)
        ours_base = model.logits(ids)
    reference = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), checkpoint)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)[None]).logits[0].numpy()
        with reference.disable_adapter():
            theirs_base = reference(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(theirs - theirs_base).max() > 0.1  # the trained adapter changes the model
    # fp16 programs: measured 0.018 against a change of 2.8 the adapter makes
    assert np.abs(ours - theirs).max() < 0.05
    assert np.abs(ours_base - theirs_base).max() < 0.05


def test_lora_resume_without_its_flags_is_bitwise_exact(corpus, base, straight, tmp_path):
    """An adapter run (rank 4, alpha 8, targets q,v,down, warmup 2: none of them defaults) resumed through the CLI
    with none of its flags: base, LoRA settings and schedule come from the checkpoint, and the run ends with bitwise
    the adapter, moments and losses of the uninterrupted one. Flags repeated as they were (targets in another order)
    are accepted."""
    out = tmp_path / "interrupted"

    def interrupt(record: dict) -> None:
        if record["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(lora_settings(corpus, base, out), on_step=interrupt).run()
    resumed = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", str(STEPS), "--out", str(out),
                                       "--resume", "--backend", "emulator"])
    assert resumed.exit_code == 0, resumed.output
    got, want = load_checkpoint(latest_checkpoint(out)), load_checkpoint(straight[1]["checkpoint"])
    for mine, theirs in zip(got[:2], want[:2]):
        assert mine.keys() == theirs.keys()
        assert all(mine[k].tobytes() == theirs[k].tobytes() for k in theirs)
    assert got[2]["lora"] == want[2]["lora"] and got[2]["base"] == want[2]["base"]
    assert got[2]["settings"] | {"out": ""} == want[2]["settings"] | {"out": ""}
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (out, straight[0])]
    assert len(losses[0]) == STEPS and losses[0] == losses[1]

    again = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", str(STEPS + 1), "--out", str(out),
                                     "--resume", "--backend", "emulator", "--base", str(base), "--lora-rank", "4",
                                     "--lora-alpha", "8", "--lora-targets", "down,v,q"])
    assert again.exit_code == 0, again.output
    assert load_checkpoint(latest_checkpoint(out))[2]["lora"] == want[2]["lora"]


def test_lora_settings_errors(corpus, base, tmp_path):
    with pytest.raises(SettingsError, match="needs a base model"):
        make_trainer(lora_settings(corpus, base, tmp_path / "a", base=None))
    with pytest.raises(OrionError, match="unknown LoRA target 'qq'"):
        make_trainer(lora_settings(corpus, base, tmp_path / "b", lora_targets="q,qq"))


@pytest.fixture(scope="module")
def other_base(base, tmp_path_factory) -> Path:
    """The base model with one weight nudged: same shape and tokenizer, another model."""
    config, weights = read_llama(base)
    weights["layers.0.wq"] = weights["layers.0.wq"] + 1e-3
    return export_hf(weights, config, tmp_path_factory.mktemp("other") / "hf",
                     {n: (base / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")})


@pytest.mark.parametrize("flag, value, message", [
    ("--lora-rank", "8", "--lora-rank is 8, but {checkpoint} was trained with lora_rank 4; "),
    ("--lora-alpha", "16", "--lora-alpha is 16.0, but {checkpoint} was trained with lora_alpha 8.0; "),
    ("--lora-targets", "q,v", "--lora-targets is q,v, but {checkpoint} was trained with lora_targets q,v,down; "),
    ("--base", None, "--base {value} is not the base model {checkpoint} was trained on ({held}, sha256 "),
])
def test_lora_resume_refuses_a_flag_that_contradicts_the_checkpoint(corpus, base, other_base, straight, flag, value,
                                                                    message):
    out = straight[0]
    value = str(other_base) if value is None else value
    before = sorted(p.name for p in out.iterdir())
    result = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", str(STEPS + 1), "--out", str(out),
                                      "--resume", "--backend", "emulator", flag, value])
    assert result.exit_code == 2, result.output
    checkpoint = Path(straight[1]["checkpoint"])
    expected = "error: " + message.format(checkpoint=checkpoint, value=value, held=base.resolve())
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected), result.stderr
    assert f"leave {flag} out, or use another --out" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_lora_resume_finds_its_base_by_path_and_checks_it_by_digest(corpus, base, tmp_path):
    """Resumed without --base, an adapter run reads the base from the path its checkpoint records; a model changed
    there since is refused, a path gone is named with the fix, and the same model given elsewhere with --base is
    accepted (the sha256 decides, not the path)."""
    config, weights = read_llama(base)
    copy = export_hf(weights, config, tmp_path / "base",
                     {n: (base / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")})
    out = tmp_path / "run"
    make_trainer(lora_settings(corpus, copy, out, steps=1, warmup=1)).run()
    weights["layers.1.w2"] = weights["layers.1.w2"] * np.float32(1.001)
    export_hf(weights, config, copy)
    with pytest.raises(OrionError, match=rf"the base model {copy} changed since {out / 'checkpoint-00000001'} was "
                                         "trained on it .*; give --base: the model it was trained on"):
        make_trainer(TrainSettings(data=str(corpus), out=str(out), steps=2), resume=True)
    for file in copy.iterdir():
        file.unlink()
    copy.rmdir()
    with pytest.raises(OrionError, match=rf"{out / 'checkpoint-00000001'} adapts the base model {copy}, which cannot "
                                         r"be read now \(no such model folder.*\); give --base"):
        make_trainer(TrainSettings(data=str(corpus), out=str(out), steps=2), resume=True)
    make_trainer(TrainSettings(data=str(corpus), out=str(out), steps=2, base=str(base)), resume=True).run()
    assert load_checkpoint(latest_checkpoint(out))[2]["base"]["path"] == str(base)


def test_cli_trains_exports_and_generates_with_the_adapter(corpus, base, tmp_path):
    out = tmp_path / "cli"
    trained = CliRunner().invoke(cli, ["train", "--base", str(base), "--data", str(corpus), "--steps", "3",
                                       "--batch", "2", "--seq-len", "32", "--lr", "1e-2", "--lora-rank", "4",
                                       "--lora-alpha", "8", "--lora-targets", "q,v", "--out", str(out),
                                       "--backend", "emulator"])
    assert trained.exit_code == 0, trained.output
    exported = CliRunner().invoke(cli, ["export", str(out / "checkpoint-00000003"), "--out", str(tmp_path / "ad")])
    assert exported.exit_code == 0, exported.output
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["self_attn.q_proj", "self_attn.v_proj"]

    args = ["generate", "--model", str(base), "--prompt", "Once upon a time", "--max-tokens", "6", "--temperature",
            "0", "--backend", "emulator"]
    with_adapter = CliRunner().invoke(cli, [*args, "--adapter", str(tmp_path / "ad")])
    assert with_adapter.exit_code == 0, with_adapter.output
    with orion.load(str(base), backend="emulator") as model:
        model.set_adapter(model.load_adapter(tmp_path / "ad"))
        expected = model.generate("Once upon a time", max_tokens=6, temperature=0)
    assert with_adapter.stdout.startswith("Once upon a time" + expected)

    refused = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", "3", "--lora-rank", "4",
                                       "--out", str(tmp_path / "x"), "--backend", "emulator"])
    assert refused.exit_code == 2 and "--base" in refused.output


def test_base_without_lora_fine_tunes_the_whole_model(corpus, base, straight, tmp_path):
    """Step 1 of a fine-tune from the base and of an adapter run (B = 0) both evaluate the base on the same batch."""
    result = make_trainer(lora_settings(corpus, base, tmp_path / "full", lora_rank=None, steps=3)).run()
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    adapter_first = json.loads((straight[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(adapter_first["loss"], abs=1e-6)
    weights, _, state = load_checkpoint(result["checkpoint"])
    config, base_weights = read_llama(base)
    assert "lora" not in state and weights.keys() == base_weights.keys()
    assert state["config"] == config.to_dict()
    assert not np.array_equal(weights["layers.0.wq"], base_weights["layers.0.wq"])
