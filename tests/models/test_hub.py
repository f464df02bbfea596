"""Model folders: hub resolution (never online), config, safetensors weights against torch, tokenizers against
transformers, and streaming decode against Python's own UTF-8 decoder."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion.errors import BindingError, OrionError, SettingsError, UnsafePathError, WeightFileError
from orion.models.bench import randomize_biases_and_norms
from orion.models.hub import (
    HUB_FILES,
    SafetensorsFile,
    Tokenizer,
    load_weights,
    read_config,
    read_safetensors,
    resolve_model,
    train_bpe_tokenizer,
)

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

EOT = "<|endoftext|>"
# Mostly ASCII, so the BPE learns English merges while emoji and CJK stay split into byte tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Once upon a time there was a little robot who liked to count the stars at night.",
    "She said: \"numbers like 1234 and 56.78 are fine\", then went home.\n\tIndented line.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00fcber stra\u00dfe.",
    "\u4f60\u597d\u4e16\u754c and \U0001f389 party",
] * 20
SAMPLES = [
    "Hello world, the fox counts stars.",
    "Unseen words: zygomorphic quixotic jabberwocky 9876543210!",
    "Mixed \u4f60\u597d \U0001f600\U0001f680 caf\u00e9 \u00d8resund \u0928\u092e\u0938\u094d\u0924\u0947",
    "  leading spaces, trailing tabs\t\t\nand newlines\n\n",
    f"two texts{EOT}joined",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, written from its published definition (the test's oracle)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def token_bytes(token: str) -> bytes:
    return bytes(CHAR_BYTES[c] for c in token)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: one trained tokenizer and one tiny random GPT-2 for the module


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(CORPUS, 400, folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def save_model(folder, tok, dtype=torch.float32, **save_options):
    eos = tok.token_to_id(EOT)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=tok.vocab_size, n_positions=128,
                                     bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = randomize_biases_and_norms(transformers.GPT2LMHeadModel(config)).eval().to(dtype)
    model.save_pretrained(folder, safe_serialization=True, **save_options)
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tok, tok_dir):
    folder = tmp_path_factory.mktemp("gpt2")
    model = save_model(folder, tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    return folder, model



# ---------------------------------------------------------------------------------------------------------------------
# resolve_model / read_config


def test_local_folder_is_used_as_is(gpt2, no_network):
    folder, model = gpt2
    assert resolve_model(str(folder)) == folder
    assert read_config(folder)["n_embd"] == model.config.n_embd == 64
    assert no_network == []


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(OrionError, match="is not a model folder: no config.json"):
        resolve_model(str(tmp_path))


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OrionError, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "config.json"))


@pytest.mark.parametrize("name", ["./missing-model", "../missing/model", "a/b/c", "/no/such/dir", "a\\b"])
def test_missing_path_that_is_no_hub_id(name, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(OrionError, match="no such model folder"):
        resolve_model(name)


def test_hub_id_downloads_only_what_orion_reads(gpt2, monkeypatch, tmp_path):
    folder, _ = gpt2
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model("openai-community/gpt2", cache_dir=tmp_path) == folder
    (repo_id, kwargs), = calls
    assert repo_id == "openai-community/gpt2" and kwargs["cache_dir"] == tmp_path
    assert set(kwargs["allow_patterns"]) == {
        "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json", "generation_config.json"}
    assert HUB_FILES == kwargs["allow_patterns"]


def _response(status):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/gpt2"))


def _hub_errors():
    from huggingface_hub import errors as E

    return [
        (E.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), "offline"),
        (E.RepositoryNotFoundError("404 Client Error", response=_response(404)), "not found"),
        (E.GatedRepoError("403 Client Error", response=_response(403)), "gated"),
        (E.RevisionNotFoundError("404 Client Error", response=_response(404)), "revision"),
        (E.HfHubHTTPError("500 Server Error", response=_response(500)), "500"),
        (E.OfflineModeIsEnabled("offline mode is enabled"), "HF_HUB_OFFLINE"),
        (E.HFValidationError("Repo id must be ..."), "valid"),
        (ConnectionError("Connection reset by peer\ntraceback detail"), "ConnectionError: Connection reset by peer"),
        (OSError(28, "No space left on device"), "No space left"),
    ]


@pytest.mark.parametrize("error, reason", _hub_errors(), ids=lambda v: type(v).__name__ if isinstance(v, Exception)
                         else None)
def test_every_hub_failure_is_one_clear_error(error, reason, monkeypatch):
    def fake(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(OrionError) as info:
        resolve_model("gpt2")
    message = str(info.value)
    assert message.startswith("could not fetch 'gpt2' from the Hugging Face hub (")
    assert message.endswith("pass a local folder in Hugging Face layout (config.json, model.safetensors, "
                            "tokenizer files)")
    assert reason in message and "\n" not in message
    assert info.value.__suppress_context__  # no chained traceback from inside huggingface_hub


def test_hf_hub_offline_gives_one_clear_error(monkeypatch, tmp_path, no_network):
    """The real snapshot_download, offline through the variable alone (set after huggingface_hub was imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OrionError, match=r"^could not fetch 'gpt2' from the Hugging Face hub \(offline"):
        resolve_model("gpt2", cache_dir=tmp_path)
    assert no_network == []


def test_hub_repo_without_config(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    with pytest.raises(OrionError, match="'someone/weights-only' has no config.json"):
        resolve_model("someone/weights-only")


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(OrionError, match="config.json: not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"n_embd": 64,\n "n_head": }')
    with pytest.raises(OrionError, match=r"config.json: invalid JSON at line 2"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(OrionError, match="config.json: holds a JSON list"):
        read_config(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Weights against torch


def expected_tensors(model) -> dict[str, np.ndarray]:
    """The model's state dict in float32 numpy, without the classifier tied to the token embedding (not saved)."""
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("lazy", [False, True])
def test_weights_equal_torch_state_dict(gpt2, lazy):
    folder, model = gpt2
    weights = load_weights(folder, lazy=lazy)
    expected = expected_tensors(model)
    assert set(weights) == set(expected)
    for name, array in expected.items():
        assert weights[name].dtype == np.float32 and weights[name].shape == array.shape, name
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    weights[next(iter(weights))][...] = 0  # arrays are the caller's to modify


@pytest.mark.parametrize("lazy", [False, True])
def test_sharded_checkpoint_loads_the_same(tmp_path, gpt2, tok, lazy):
    folder, model = gpt2
    save_model(tmp_path, tok, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded, single = load_weights(tmp_path, lazy=lazy), load_weights(folder)
    assert set(sharded) == set(single)
    for name in single:
        np.testing.assert_array_equal(sharded[name], single[name], err_msg=name)


def test_a_lazy_file_reads_each_tensor_when_asked_and_refuses_a_file_changed_since(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    save_file(arrays, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    weights = load_weights(tmp_path, lazy=True)
    assert isinstance(weights, SafetensorsFile) and len(weights) == 2
    got = weights["a"]
    assert got is not weights["a"] and np.array_equal(got, arrays["a"])
    got[...] = 0  # a new array each time: the caller's to change
    assert np.array_equal(weights["a"], arrays["a"])
    save_file({**arrays, "c": np.zeros(4, np.float16)}, str(tmp_path / "model.safetensors"))  # "b" moved
    with pytest.raises(WeightFileError, match="changed since it was opened; load the model again"):
        weights["b"]


def test_bf16_checkpoint_widens_exactly(tmp_path, tok):
    model = save_model(tmp_path, tok, dtype=torch.bfloat16)
    weights = load_weights(tmp_path)
    expected = expected_tensors(model)  # torch's own bf16 -> float32
    assert set(weights) == set(expected)
    for name, array in expected.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name].view(np.uint32), array.view(np.uint32), err_msg=name)


def test_bf16_special_values(tmp_path):
    from safetensors.torch import save_file

    bits = torch.tensor([0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x3F80, 0xC2F7],
                        dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    save_file({"v": bits.reshape(2, 5)}, str(tmp_path / "x.safetensors"))
    got = read_safetensors(tmp_path / "x.safetensors")["v"]
    want = bits.float().reshape(2, 5).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_other_dtypes_keep_their_type(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    arrays = {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": rng.standard_normal((4,)).astype(np.float32),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": rng.integers(-(2**62), 2**62, 6, dtype=np.int64),
        "i32": rng.integers(-1000, 1000, (2, 3), dtype=np.int32),
        "i8": rng.integers(-128, 127, 7, dtype=np.int8),
        "u8": rng.integers(0, 255, 9, dtype=np.uint8),
        "b": rng.integers(0, 2, 5).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    save_file(arrays, str(tmp_path / "model.safetensors"))
    got = read_safetensors(tmp_path / "model.safetensors")
    assert set(got) == set(arrays)
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)


# ---------------------------------------------------------------------------------------------------------------------
# Damaged weight files


def write_safetensors(path, header, data: bytes, header_len: int | None = None, raw_header: bytes | None = None):
    """A safetensors file written by hand, so tests can break any part of it."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)


GOOD_HEADER = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
               "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}
GOOD_DATA = np.arange(6, dtype="<f4").tobytes() + np.arange(4, dtype="<f2").tobytes()


def with_entry(name, **changes):
    header = json.loads(json.dumps(GOOD_HEADER))
    header[name].update(changes)
    return header


DAMAGE = {
    "shorter than the length field": dict(raw=b"\x10\x00\x00"),
    "header length past the end": dict(header=GOOD_HEADER, data=GOOD_DATA, header_len=10**6),
    "header not JSON": dict(raw_header=b'{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]',
                            data=GOOD_DATA),
    "header not UTF-8": dict(raw_header=b'{"\xff\xfe": 1}', data=GOOD_DATA),
    "header not an object": dict(raw_header=b"[1, 2, 3]", data=GOOD_DATA),
    "entry not an object": dict(header={"a": [0, 24]}, data=GOOD_DATA),
    "unknown dtype": dict(header=with_entry("a", dtype="F8_E4M3"), data=GOOD_DATA),
    "bad shape": dict(header=with_entry("a", shape=[2, -3]), data=GOOD_DATA),
    "bad offsets": dict(header=with_entry("a", data_offsets=[0]), data=GOOD_DATA),
    "reversed offsets": dict(header=with_entry("a", data_offsets=[24, 0]), data=GOOD_DATA),
    "tensor past the end (truncated data)": dict(header=GOOD_HEADER, data=GOOD_DATA[:20]),
    "tensor range past the end": dict(header=with_entry("b", data_offsets=[24, 4000]), data=GOOD_DATA),
    "size does not fit shape": dict(header=with_entry("a", shape=[2, 4]), data=GOOD_DATA),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_damage_is_a_weight_file_error(kind, tmp_path):
    spec = DAMAGE[kind]
    path = tmp_path / "model.safetensors"
    if "raw" in spec:
        path.write_bytes(spec["raw"])
    else:
        write_safetensors(path, spec.get("header"), spec["data"], spec.get("header_len"), spec.get("raw_header"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightFileError) as info:
        load_weights(tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert info.value.__suppress_context__ or info.value.__context__ is None


def test_the_undamaged_hand_written_file_reads(tmp_path):
    """The damage cases above break a file that is otherwise valid (checked with safetensors' own reader)."""
    from safetensors.numpy import load_file

    path = tmp_path / "model.safetensors"
    write_safetensors(path, GOOD_HEADER, GOOD_DATA)
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert set(ours) == set(theirs) == {"a", "b"}
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(WeightFileError, match=r"no model.safetensors .*pytorch_model.bin.*never unpickles"):
        load_weights(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(OrionError, match="no such model folder"):
        load_weights(tmp_path / "nope")


def write_index(folder, weight_map):
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name", ["../evil.safetensors", "sub/../../evil.safetensors", "..\\evil.safetensors",
                                  "/tmp/evil.safetensors", "C:\\evil.safetensors", "C:evil.safetensors"])
def test_unsafe_shard_names_are_refused(name, tmp_path):
    write_safetensors(tmp_path / "evil.safetensors", GOOD_HEADER, GOOD_DATA)  # exists, so only the name can stop it
    write_index(tmp_path / "m", {"a": name, "b": name})
    with pytest.raises(UnsafePathError, match="would leave the model folder"):
        load_weights(tmp_path / "m")


def test_shard_in_a_subfolder_is_fine(tmp_path):
    (tmp_path / "sub").mkdir()
    write_safetensors(tmp_path / "sub" / "s1.safetensors", GOOD_HEADER, GOOD_DATA)
    write_index(tmp_path, {"a": "sub/s1.safetensors", "b": "./sub/s1.safetensors"})
    assert set(load_weights(tmp_path)) == {"a", "b"}


def test_index_faults(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", GOOD_HEADER, GOOD_DATA)
    write_index(tmp_path, {"a": "s1.safetensors", "c": "s1.safetensors"})
    with pytest.raises(WeightFileError, match="tensor 'c' is listed in shard 's1.safetensors', which does not hold"):
        load_weights(tmp_path)
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(WeightFileError, match="lists shard 's2.safetensors', which is not in"):
        load_weights(tmp_path)
    write_safetensors(tmp_path / "s2.safetensors", GOOD_HEADER, GOOD_DATA)
    with pytest.raises(WeightFileError, match="also in another shard"):
        load_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(WeightFileError, match="model.safetensors.index.json: invalid JSON"):
        load_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(WeightFileError, match="no \"weight_map\""):
        load_weights(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_trained_tokenizer(tok, tok_dir):
    assert (tok_dir / "tokenizer.json").is_file()
    assert 256 < tok.vocab_size <= 400
    assert tok.eos_id == tok.token_to_id(EOT)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(EOT) == [tok.eos_id]


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(SettingsError, match="vocab_size 100"):
        train_bpe_tokenizer(["abc"], 100, tmp_path)


def test_tokenizer_matches_transformers(tok, tok_dir):
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for text in SAMPLES + CORPUS[:5]:
        assert tok.encode(text) == reference.encode(text), text
    ids = tok.encode(SAMPLES[2])
    assert tok.decode(ids) == reference.decode(ids)
    assert tok.vocab_size == len(reference)


def test_vocab_and_merges_folder(tok, tmp_path):
    tok.inner.model.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": tok.eos_id}))
    loaded = Tokenizer.from_dir(tmp_path)
    reference = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert loaded.eos_id == tok.eos_id
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text) == reference.encode(text), text
        assert loaded.decode(loaded.encode(text)) == text


THE, FOX = "\u0120the", "\u0120fox"  # word tokens of the trained vocabulary (GPT-2 marks a leading space as \u0120)


@pytest.mark.parametrize("files, expected", [
    ({"tokenizer_config.json": {"eos_token": THE}}, THE),
    ({"special_tokens_map.json": {"eos_token": {"content": THE, "lstrip": False}}}, THE),
    ({"tokenizer_config.json": {"eos_token": FOX}, "special_tokens_map.json": {"eos_token": THE}}, FOX),
    ({"tokenizer_config.json": {"eos_token": "no-such-token"}, "config.json": {"eos_token_id": 5}}, 5),
    ({"config.json": {"eos_token_id": [7, 8]}}, 7),
    ({"config.json": {"eos_token_id": 10**9}}, None),
    ({}, None),
])
def test_eos_id_sources(files, expected, tok, tok_dir, tmp_path):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    want = tok.token_to_id(expected) if isinstance(expected, str) else expected
    assert want is not None or not isinstance(expected, str)
    assert Tokenizer.from_dir(tmp_path).eos_id == want


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(OrionError, match="has no tokenizer: expected tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_missing(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with pytest.raises(OrionError, match="pip install sentencepiece, or provide a tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_adapter(tmp_path, monkeypatch):
    """The SentencePiece path with a stand-in processor (the package is not installed here)."""
    pieces = ["<unk>", "<s>", "</s>", "\u2581hi", "!"]

    class Processor:
        def __init__(self, model_file):
            assert model_file == str(tmp_path / "tokenizer.model")

        def get_piece_size(self):
            return len(pieces)

        def piece_to_id(self, piece):
            return pieces.index(piece) if piece in pieces else 0

        def id_to_piece(self, i):
            return pieces[i]

        def encode(self, text):
            return [3, 4] if text == "hi!" else []

        def decode(self, ids):
            return "".join(pieces[i] for i in ids).replace("\u2581", " ").lstrip()

    monkeypatch.setitem(sys.modules, "sentencepiece", types.SimpleNamespace(SentencePieceProcessor=Processor))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    sp = Tokenizer.from_dir(tmp_path)
    assert sp.vocab_size == 5 and sp.eos_id == 2
    assert sp.token_to_id("missing") is None and sp.token_to_id("<unk>") == 0
    assert sp.encode("hi!") == [3, 4] and sp.decode([3, 4]) == "hi!"
    stream = sp.stream()
    assert "".join(stream.push(i) for i in [3, 4, 3]) + stream.flush() == "hi! hi"


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(OrionError, match="tokenizer.json: cannot load this tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_decode_refuses_ids_outside_the_vocabulary(tok):
    with pytest.raises(BindingError, match=f"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([1, tok.vocab_size])


# ---------------------------------------------------------------------------------------------------------------------
# Streaming decode


def stream_all(tok, ids):
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.flush()


def test_stream_emoji_and_cjk(tok):
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one emoji of five code points
    text = f"Stars \U0001f31f\U0001f680 and \u4f60\u597d\u4e16\u754c, caf\u00e9 {family} end"
    ids = tok.encode(text)
    # The test is only worth something if some tokens hold part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, rest = stream_all(tok, ids)
    assert "".join(pieces) + rest == text
    assert rest == "" and not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_stream_of_any_text_is_the_text(tok, text):
    pieces, rest = stream_all(tok, tok.encode(text))
    assert "".join(pieces) + rest == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces + [rest])


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_stream_of_any_tokens_matches_python_utf8(tok, data):
    """Arbitrary token sequences, invalid UTF-8 included: the stream equals Python's own lossy decode of the bytes,
    and every piece is complete (a piece's U+FFFD is one Python also produces at that point)."""
    ordinary = [i for i in range(tok.vocab_size) if i != tok.eos_id]
    ids = data.draw(st.lists(st.sampled_from(ordinary), min_size=1, max_size=12))
    raw = b"".join(token_bytes(tok.id_to_token(i)) for i in ids)
    pieces, rest = stream_all(tok, ids)
    assert "".join(pieces) + rest == raw.decode("utf-8", errors="replace")
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert raw.decode("utf-8", errors="replace").startswith(emitted)


def test_stream_emits_invalid_bytes_once_they_are_known_invalid(tok):
    lone_continuation, lead_of_3, a = (tok.token_to_id(BYTE_CHARS[b]) for b in (0x80, 0xE4, ord("a")))
    stream = tok.stream()
    assert stream.push(lone_continuation) == ""  # held: ends in U+FFFD
    assert stream.push(a) == "\ufffda"  # now known invalid: emitted as U+FFFD, like Python's decoder
    assert stream.push(lead_of_3) == ""  # could still become a character
    assert stream.flush() == "\ufffd"  # the text ended: it never did
    assert stream.push(a) == "a"  # flush starts afresh


def test_bytes_table_oracle_agrees_with_the_vocabulary(tok):
    """The oracle table above is GPT-2's: every single-byte token of the trained vocabulary is one of its chars."""
    assert len(set(BYTE_CHARS.values())) == 256
    assert all(tok.token_to_id(c) is not None for c in BYTE_CHARS.values())
