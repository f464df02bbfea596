"""Shared fixtures: run a graph the way users do (emit MIL text + weights, load the text, run the emulator)."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import numpy as np
import pytest

from orion.ir.graph import Graph
from orion.mil.emit import emit
from orion.models.llama import LlamaConfig, init_weights
from orion.runtime.budget import PROCESS_BUDGET
from orion.runtime.backends.emulator import load_program

_counter = itertools.count()


def emulate(graph: Graph, inputs: dict[str, np.ndarray], directory: Path, **emit_options) -> dict[str, np.ndarray]:
    """Emit ``graph``, write it under a fresh folder of ``directory``, parse it back and run it on the emulator."""
    target = directory / f"g{next(_counter)}"
    emit(graph, **emit_options).write(target)
    return load_program(target).run(inputs)


def assert_ane_head_is_the_cpu_head(model, width: int, vocab: int) -> None:
    """A model's classifier on the ANE (``head="ane"``) gives its CPU classifier's logits, within 1% of their
    largest, on random hidden rows."""
    hidden = np.random.default_rng(6).normal(0, 3, (5, width)).astype(np.float32)
    got = model._head(hidden)
    model.head = "cpu"
    expected = model._head(hidden)
    model.head = "ane"
    assert got.shape == expected.shape == (5, vocab)
    assert np.abs(got - expected).max() < 0.01 * np.abs(expected).max()


def llama_weights(config: LlamaConfig, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Orion's Llama initialization with its matrices times ``scale`` and every RMSNorm gain drawn from
    1 + N(0, 0.2): at init's gains of 1, code that dropped a gain or applied one in the wrong place would pass."""
    rng = np.random.default_rng(seed)
    weights = init_weights(config, seed)
    for name, w in weights.items():
        gain = name.endswith("norm")
        weights[name] = (1 + 0.2 * rng.standard_normal(w.shape) if gain else scale * w).astype(np.float32)
    return weights


@pytest.fixture(autouse=True, scope="session")
def _isolated_program_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/orion, and ``auto`` means this machine's default whatever the
    user's ORION_BACKEND says."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ORION_CACHE_DIR", str(tmp_path_factory.mktemp("orion-cache")))
    mp.delenv("ORION_BACKEND", raising=False)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _fresh_process_budget(monkeypatch):
    """Each test counts its compiles against the process budget as if it ran in a process of its own: the suite as
    a whole compiles far more programs than one process may (ORION_COMPILE_BUDGET, 100)."""
    monkeypatch.setattr(PROCESS_BUDGET, "used", 0)


@pytest.fixture
def run_graph(tmp_path):
    return lambda graph, inputs, **kw: emulate(graph, inputs, tmp_path, **kw)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded and refused; tests assert none happened."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


#: Short stories for the tiny tokenizer of :func:`tiny_gpt2_dir`.
STORY_TEXTS = ["Once upon a time there was a little fox who loved the moon. " * 3,
               "The cat sat on the mat and purred all day long. " * 3] * 20


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A random GPT-2 (2 blocks, d 64; random biases and norms too) saved by transformers in Hugging Face layout,
    with a BPE tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from orion.models.bench import randomize_biases_and_norms
    from orion.models.hub import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = train_bpe_tokenizer(STORY_TEXTS, 300, folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=tok.vocab_size, n_positions=128,
                                     eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    model = randomize_biases_and_norms(transformers.GPT2LMHeadModel(config))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_adapters(tiny_gpt2_dir, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT LoRA adapters of :func:`tiny_gpt2_dir`, saved by peft, with other targets and ranks ("fox": rank 4
    on c_attn and c_fc; "cat": rank 2 on c_attn and c_proj) and random A and B: each changes the text."""
    import copy
    import warnings

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    folders = {}
    for seed, (name, rank, alpha, targets) in enumerate([("fox", 4, 16, ["c_attn", "c_fc"]),
                                                          ("cat", 2, 8, ["c_attn", "c_proj"])]):
        torch.manual_seed(seed + 1)
        folders[name] = tmp_path_factory.mktemp("adapters") / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
            peft.get_peft_model(copy.deepcopy(base), settings).save_pretrained(folders[name])
    return folders


from tests.runtime.standin import ane_standin, standin_root  # noqa: E402,F401  (fixtures for backend="ane" tests)
