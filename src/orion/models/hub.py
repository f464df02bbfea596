"""Model folders in Hugging Face layout: find or fetch one, read its config, weights and tokenizer.

Why this reads safetensors itself: the format is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets}}``) and the raw data, so checking every length and offset before reading turns
a damaged download into one :class:`WeightFileError` that names the file and the fault, and bf16 (which numpy lacks;
``safetensors``' numpy API raises ``TypeError: data type 'bfloat16' not understood``) widens exactly to float32 by
putting its 16 bits on top of a zero low half. Pickle checkpoints (``.bin``, ``.pt``) are never read: unpickling can
run arbitrary code.

``huggingface_hub`` and ``tokenizers`` are imported only when needed, so weight loading works without them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from orion.errors import BindingError, OrionError, SettingsError, UnsafePathError, WeightFileError

if TYPE_CHECKING:
    import tokenizers

PathLike = str | os.PathLike

#: What :func:`resolve_model` downloads: config, safetensors weights and every tokenizer format :class:`Tokenizer`
#: reads; never pickle checkpoints.
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
]

#: What :func:`resolve_adapter` downloads: PEFT's two adapter files.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]

_LAYOUT_HINT = "pass a local folder in Hugging Face layout (config.json, model.safetensors, tokenizer files)"

#: ``owner/name`` or ``name``: letters, digits, ``-``, ``_``, ``.``; no leading dot, so ``./x`` and ``../x`` are paths.
_HUB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)?")

#: safetensors dtype -> little-endian numpy dtype. BF16 is handled apart (widened to float32).
_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_BF16_BYTES = 2

#: The token GPT-2 style byte-level BPE uses to end a text; :func:`train_bpe_tokenizer` reserves it.
END_OF_TEXT = "<|endoftext|>"
_BYTE_ALPHABET = 256


# ---------------------------------------------------------------------------------------------------------------------
# Finding a model


def resolve_model(path_or_id: str, *, cache_dir: PathLike | None = None) -> Path:
    """The folder of a model: a local folder as is, else a hub id fetched with ``huggingface_hub`` (only the files
    Orion reads). Every failure is one :class:`OrionError` that says what to pass instead."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "state.json").is_file():
            raise OrionError(f"{path} is not a model folder: no config.json; {_LAYOUT_HINT}")
        return path
    if path.exists():
        raise OrionError(f"{path} is a file, not a model folder; {_LAYOUT_HINT}")
    if not looks_like_hub_id(path_or_id):
        raise OrionError(f"no such model folder: {path}; {_LAYOUT_HINT}")
    folder = Path(_snapshot_download(path_or_id, cache_dir, HUB_FILES, _LAYOUT_HINT))
    if not (folder / "config.json").is_file():
        raise OrionError(f"the hub repository {path_or_id!r} has no config.json, so it is not a model Orion can load; "
                         f"{_LAYOUT_HINT}")
    return folder


def resolve_adapter(path_or_id: str, *, cache_dir: PathLike | None = None) -> Path:
    """The folder of a PEFT adapter (adapter_config.json, adapter_model.safetensors): a local folder, or a hub id."""
    hint = "pass a PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors) or its hub id"
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists() or not looks_like_hub_id(path_or_id):
        raise OrionError(f"no adapter folder at {path}; {hint}")
    else:
        folder = Path(_snapshot_download(path_or_id, cache_dir, ADAPTER_FILES, hint))
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").is_file():
        raise OrionError(f"{folder} holds adapter_model.bin, a pickle file Orion never reads (unpickling can run code); "
                         "re-save the adapter with safe_serialization=True")
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise OrionError(f"{folder} has no {name}; {hint}")
    return folder


def looks_like_hub_id(text: str) -> bool:
    """True for ``owner/name`` or ``name`` (at most one ``/``, no backslash, no leading dot, no ``..``)."""
    return len(text) <= 96 and ".." not in text and _HUB_ID.fullmatch(text) is not None


def _snapshot_download(repo_id: str, cache_dir: PathLike | None, patterns: list[str], hint: str) -> str:
    """``huggingface_hub.snapshot_download`` of the files matching ``patterns``, with every failure turned into one
    short, actionable error."""
    def fail(reason: str) -> OrionError:
        return OrionError(f"could not fetch {repo_id!r} from the Hugging Face hub ({reason}); {hint}")

    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise fail("the huggingface_hub package is not installed: pip install huggingface_hub") from None
    # HF_HUB_OFFLINE is read when huggingface_hub is imported; honour it when it is set later too.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        return huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=offline
        )
    except hub_errors.GatedRepoError:
        raise fail("the repository is gated: accept its terms on the hub and log in with `hf auth login`") from None
    except hub_errors.RepositoryNotFoundError:
        raise fail("repository not found, or private and you are not logged in") from None
    except hub_errors.RevisionNotFoundError:
        raise fail("revision not found") from None
    except hub_errors.LocalEntryNotFoundError:
        raise fail("offline or the hub is unreachable, and it is not in the local cache") from None
    except hub_errors.OfflineModeIsEnabled:
        raise fail("HF_HUB_OFFLINE is set") from None
    except hub_errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        raise fail(f"HTTP error {status}" if status else "HTTP error") from None
    except hub_errors.HFValidationError:
        raise fail("not a valid repository id") from None
    except Exception as e:  # network stack, disk, anything else: the user gets one line, not a traceback
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        raise fail(f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__) from None


# ---------------------------------------------------------------------------------------------------------------------
# config.json


def read_config(model_dir: PathLike) -> dict:
    """``config.json`` of a model folder as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise OrionError(f"{path}: not found; a model folder needs config.json ({_LAYOUT_HINT})")
    return _read_json_object(path, OrionError)


def _read_json_object(path: Path, error: type[OrionError]) -> dict:
    """A JSON file that must hold an object; any fault is ``error`` naming the file (and line, for bad JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                    "fix or re-download it") from None
    if not isinstance(data, dict):
        raise error(f"{path}: holds a JSON {type(data).__name__}, expected an object ({{...}})")
    return data


def _optional_json(path: Path) -> dict:
    """A JSON object file that may be absent (tokenizer side files); absent means empty."""
    return _read_json_object(path, OrionError) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def load_weights(model_dir: PathLike, lazy: bool = False) -> Mapping[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` (or of the shards its index lists), by name; bf16 becomes float32.
    ``lazy``: a mapping that reads each tensor when it is asked for (every header checked now), so that a loader
    that converts the tensors one at a time never holds them all; else a dict of them all."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise OrionError(f"no such model folder: {folder}; {_LAYOUT_HINT}")
    single = folder / "model.safetensors"
    if single.is_file():
        return SafetensorsFile(single) if lazy else read_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        tensors = _load_sharded(folder, index)
        return tensors if lazy else {name: tensors[name] for name in tensors}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    found = f" (found {', '.join(pickles)})" if pickles else ""
    raise WeightFileError(
        f"{folder} has no model.safetensors or model.safetensors.index.json{found}; Orion reads only safetensors and "
        "refuses .bin/pickle checkpoints on purpose (it never unpickles): convert the model with transformers' "
        "save_pretrained(folder, safe_serialization=True)"
    )


def _load_sharded(folder: Path, index: Path) -> "_Sharded":
    """The tensors of every shard ``model.safetensors.index.json`` names, checked against its weight map (read when
    asked for)."""
    weight_map = _read_json_object(index, WeightFileError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFileError(f"{index}: no \"weight_map\" object mapping tensor names to shard files")
    files: dict[str, SafetensorsFile] = {}
    shards = {_shard_path(folder, index, name): name for name in weight_map.values()}  # "a" and "./a": one shard
    for shard, shard_name in shards.items():
        if not shard.is_file():
            raise WeightFileError(f"{index}: lists shard {shard_name!r}, which is not in {folder}; re-download it")
        tensors = SafetensorsFile(shard)
        for name in tensors:
            if name in files:
                raise WeightFileError(f"{shard}: tensor {name!r} is also in another shard; the checkpoint is mixed up")
            files[name] = tensors
    missing = [name for name in weight_map if name not in files]
    if missing:
        raise WeightFileError(f"{index}: tensor {missing[0]!r} is listed in shard {weight_map[missing[0]]!r}, which "
                              f"does not hold it ({len(missing)} missing); re-download the shards")
    return _Sharded(files)


class _Sharded(Mapping[str, np.ndarray]):
    """The tensors of several shards by name, each read from its shard when asked for."""

    def __init__(self, files: dict[str, "SafetensorsFile"]):
        self._files = files

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    """A shard file named by the index, refused if the name could point outside the model folder."""
    if not isinstance(name, str) or not name:
        raise WeightFileError(f"{index}: shard file name {name!r} is not a file name")
    parts = re.split(r"[\\/]", name)
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in parts or "\0" in name):
        raise UnsafePathError(f"{index}: shard file name {name!r} would leave the model folder {folder}; "
                              "shard names must be relative paths inside it, without '..'")
    # Lexical check only: a hub cache folder holds symlinks into its blob store, which are fine.
    return folder.joinpath(*[p for p in parts if p not in {"", "."}])


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, each checked against the file's size before it is read."""
    tensors = SafetensorsFile(path)
    return {name: tensors[name] for name in tensors}


class SafetensorsFile(Mapping[str, np.ndarray]):
    """The tensors of one safetensors file by name, every header entry checked against the file's size at open and
    each tensor read when asked for (a new array each time). A file changed since it was opened is refused, never
    read half old, half new."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        with self._open() as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            if size < 8:
                raise WeightFileError(f"weight file {self.path}: truncated ({size} bytes, less than the 8-byte header "
                                      "length); re-download or re-save it")
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                raise WeightFileError(f"weight file {self.path}: header length {header_len} runs past the end of the "
                                      f"file ({size} bytes); the file is truncated or not safetensors")
            header = _parse_header(self.path, f.read(header_len))
        self._identity = _identity(stat)
        self._data_start = 8 + header_len
        self._entries = {name: _check_entry(self.path, name, entry, size - self._data_start)
                         for name, entry in header.items() if name != "__metadata__"}

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise WeightFileError(f"weight file {self.path}: cannot open it ({e.strerror or e})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        buf = bytearray(end - begin)
        with self._open() as f:
            if _identity(os.fstat(f.fileno())) != self._identity:
                raise WeightFileError(f"weight file {self.path} changed since it was opened; load the model again")
            f.seek(self._data_start + begin)
            if f.readinto(buf) != len(buf):
                raise WeightFileError(f"weight file {self.path}: tensor {name!r} could not be read in full; "
                                      "the file changed or is truncated")
        if dtype == "BF16":
            array = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(buf, _NUMPY_DTYPES[dtype])
            array = array.astype(array.dtype.newbyteorder("="), copy=False)
        return array.reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: its device, inode, size and modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _parse_header(path: Path, raw: bytes) -> dict:
    """The JSON header: an object of tensor entries (plus an optional ``__metadata__``)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WeightFileError(f"weight file {path}: header is not UTF-8 text; the file is damaged or not "
                              "safetensors") from None
    except json.JSONDecodeError as e:
        raise WeightFileError(f"weight file {path}: header is not valid JSON ({e.msg} at character {e.pos}); "
                              "the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"weight file {path}: header is a JSON {type(header).__name__}, expected an object")
    return header


def _check_entry(path: Path, name: str, entry: object, data_len: int) -> tuple[str, list[int], int, int]:
    """dtype, shape and byte range of one header entry, after checking they fit each other and the file."""
    where = f"weight file {path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightFileError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype != "BF16" and dtype not in _NUMPY_DTYPES:
        raise WeightFileError(f"{where}: dtype {dtype!r} is not one Orion reads; save the checkpoint as float32, "
                              "float16 or bfloat16")

    def is_count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise WeightFileError(f"{where}: shape {shape!r} is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise WeightFileError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair")
    begin, end = offsets
    if begin > end or end > data_len:
        raise WeightFileError(f"{where}: bytes [{begin}, {end}) are out of the file's {data_len}-byte data section; "
                              "the file is truncated or damaged")
    itemsize = _BF16_BYTES if dtype == "BF16" else _NUMPY_DTYPES[dtype].itemsize
    needed = math.prod(shape) * itemsize
    if end - begin != needed:
        raise WeightFileError(f"{where}: has {end - begin} bytes but shape {shape} of {dtype} needs {needed}; "
                              "the header is damaged")
    return dtype, shape, begin, end


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise OrionError("the tokenizers package is needed to read tokenizers: pip install tokenizers") from None
    return tokenizers


class Tokenizer:
    """Text <-> token ids. Wraps a Hugging Face ``tokenizers.Tokenizer``; :meth:`from_dir` also reads GPT-2's
    vocab.json + merges.txt and SentencePiece's tokenizer.model."""

    def __init__(self, inner: tokenizers.Tokenizer, *, eos_id: int | None = None):
        self.inner = inner
        self.eos_id = eos_id
        self.chat_template: str | None = None  # tokenizer_config.json's (or chat_template.jinja), for chat()
        self.special_tokens: dict[str, str] = {}  # bos_token, eos_token, ... as the template names them

    @classmethod
    def from_dir(cls, model_dir: PathLike) -> Tokenizer:
        """The tokenizer of a model folder: tokenizer.json, else vocab.json + merges.txt (byte-level BPE, as GPT-2),
        else a SentencePiece tokenizer.model."""
        folder = Path(model_dir)
        if (folder / "tokenizer.json").is_file():
            tokenizer = cls(_load_tokenizer_json(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = cls(_byte_level_bpe(folder))
        elif (folder / "tokenizer.model").is_file():
            tokenizer = _SentencePieceTokenizer.from_file(folder / "tokenizer.model")
        else:
            raise OrionError(f"{folder} has no tokenizer: expected tokenizer.json, vocab.json + merges.txt, or a "
                             "SentencePiece tokenizer.model")
        tokenizer.eos_id = _find_eos_id(folder, tokenizer)
        tokenizer.chat_template = _read_chat_template(folder)
        config = _optional_json(folder / "tokenizer_config.json")
        tokenizer.special_tokens = {key: token for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                                    if (token := _token_content(config.get(key))) is not None}
        return tokenizer

    def chat(self, messages: str | list[dict], add_generation_prompt: bool = True) -> str:
        """The model's prompt for a conversation (a user message, or ``[{"role": ..., "content": ...}, ...]``) as
        its chat template formats it; encode it with ``add_special_tokens=False`` (the template writes them)."""
        if self.chat_template is None:
            raise OrionError("this tokenizer has no chat template (tokenizer_config.json's chat_template or "
                             "chat_template.jinja)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None if the vocabulary has no such token."""
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens are added only if the tokenizer's own template adds them (GPT-2
        style byte-level BPE adds none; a Llama-style tokenizer.json adds its BOS as the model was trained) and
        ``add_special_tokens``."""
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included as text, so ``decode(encode(t)) == t`` for GPT-2 style."""
        return self.inner.decode(self._check_ids(ids), skip_special_tokens=False)

    def stream(self) -> StreamDecoder:
        """A decoder that turns token ids into text one at a time, for printing while generating."""
        return StreamDecoder(self.decode)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise BindingError(f"token id {i} is outside the vocabulary (0 ... {n - 1}); check the model and "
                                   "tokenizer belong together")
        return ids


class _SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``tokenizer.model`` behind the :class:`Tokenizer` interface (Llama-1/2 style folders)."""

    @classmethod
    def from_file(cls, path: Path) -> _SentencePieceTokenizer:
        try:
            import sentencepiece
        except ImportError:
            raise OrionError(f"{path.parent} has only a SentencePiece tokenizer.model and the sentencepiece package "
                             "is not installed: pip install sentencepiece, or provide a tokenizer.json") from None
        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece reports a bad file as OSError or RuntimeError depending on version
            raise OrionError(f"{path}: not a SentencePiece model ({e}); re-download it") from None
        return cls(processor)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        # piece_to_id answers the unknown-token id for pieces it lacks; only an exact round trip is a hit.
        i = self.inner.piece_to_id(token)
        return i if self.inner.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.inner.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(self._check_ids(ids))


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    tk = _import_tokenizers()
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with the serde message
        raise OrionError(f"{path}: cannot load this tokenizer ({e}); re-download it") from None


def _byte_level_bpe(folder: Path) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from vocab.json + merges.txt: byte-level BPE, no prefix space, declared special tokens."""
    tk = _import_tokenizers()
    try:
        model = tk.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:  # bad JSON in vocab.json or a malformed merges line
        raise OrionError(f"{folder}: cannot read vocab.json + merges.txt ({e}); re-download them") from None
    inner = tk.Tokenizer(model)
    inner.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = tk.decoders.ByteLevel()
    # Without this, "<|endoftext|>" in text would be split into pieces instead of mapping to its one id.
    special = [t for t in _declared_special_tokens(folder, inner.id_to_token) if inner.token_to_id(t) is not None]
    inner.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in special])
    return inner


def _read_chat_template(folder: Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template: a string, or named templates of which
    "default" is the one a plain chat uses."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _optional_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **special_tokens: str) -> str:
    """Render a Hugging Face chat template with jinja2 in a sandbox (a template is code from the download), with
    the names templates use: ``messages``, ``add_generation_prompt``, the special tokens, ``raise_exception``."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise OrionError("chat templates need jinja2: pip install 'orion-ane[chat]'") from None
    from datetime import datetime

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special_tokens)
    except TemplateError as exc:
        raise OrionError(f"the chat template failed: {exc}") from None


def _token_content(value: object) -> str | None:
    """A token as tokenizer_config.json / special_tokens_map.json write it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config_token_ids(config: dict, key: str) -> list[int]:
    """``bos_token_id`` / ``eos_token_id`` of config.json: an int or (Llama 3) a list of ints."""
    value = config.get(key)
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _declared_special_tokens(folder: Path, id_to_token: Callable[[int], str | None]) -> list[str]:
    """Special token strings the folder's side files name, in order, without repeats."""
    found: list[str] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _optional_json(folder / name)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            found.append(_token_content(data.get(key)))
        extra = data.get("additional_special_tokens")
        found.extend(_token_content(t) for t in (extra if isinstance(extra, list) else []))
    config = _optional_json(folder / "config.json")
    for key in ("bos_token_id", "eos_token_id"):
        found.extend(id_to_token(i) for i in _config_token_ids(config, key) if i >= 0)
    return [t for t in dict.fromkeys(found) if t]


def _find_eos_id(folder: Path, tokenizer: Tokenizer) -> int | None:
    """The end-of-text id: tokenizer_config.json, then special_tokens_map.json, then config.json's eos_token_id."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _token_content(_optional_json(folder / name).get("eos_token"))
        if token is not None and (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    ids = _config_token_ids(_optional_json(folder / "config.json"), "eos_token_id")
    return next((i for i in ids if 0 <= i < tokenizer.vocab_size), None)


class StreamDecoder:
    """Token ids in, text out as soon as it is complete.

    A byte-level token can hold part of a UTF-8 character (an emoji is often 2-4 tokens), and decoding it alone gives
    U+FFFD. So each step decodes the ids since the last point where text was complete and emits only the new part,
    holding it back while it ends in U+FFFD: an incomplete character is never emitted, and a truly invalid byte
    sequence is (its U+FFFD, once a later token or :meth:`flush` shows nothing will complete it). Decoding from the
    previous complete point, not from the last token, keeps decoders that strip a leading space consistent.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._read = 0  # ids before this index are emitted; ids before 0 were complete text (the decode window start)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        done = self._decode(self._ids[:self._read])
        text = self._decode(self._ids)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """The text still held back (an incomplete character becomes U+FFFD), and start afresh."""
        done = self._decode(self._ids[:self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(done):]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: PathLike) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on ``texts`` (offline, seconds for small data), save ``tokenizer.json`` and
    a ``tokenizer_config.json`` naming ``<|endoftext|>`` as end of text into ``out_dir``, and return it."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _BYTE_ALPHABET + 1:
        raise SettingsError(f"vocab_size {vocab_size!r} is too small: a byte-level BPE needs at least "
                            f"{_BYTE_ALPHABET + 1} (256 bytes and {END_OF_TEXT})")
    if isinstance(texts, str):
        texts = [texts]  # a lone string would otherwise be iterated character by character
    tk = _import_tokenizers()
    inner = tk.Tokenizer(tk.models.BPE())
    inner.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    inner.train_from_iterator(texts, trainer)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    inner.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_TEXT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Tokenizer.from_dir(folder)
