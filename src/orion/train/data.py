"""Training data: text sources in, flat uint16 token files out, and reproducible batches from those files.

Why this layout: llama2.c and nanoGPT store a corpus as one flat array of uint16 token ids, documents separated by
the end-of-text id. A memory map of that array costs no RAM however large the corpus (TinyStories is ~500M tokens),
and a training window is any slice of it. Text is only ever streamed (line by line), so preparing a multi-GB corpus
needs memory for one batch of documents, not for the file.

A :class:`BatchStream`'s whole position is a handful of integers (seed, epoch, step), so a checkpoint stores it as
JSON and a resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from orion.errors import OrionError, SettingsError
from orion.fileio import atomic_write
from orion.models.hub import END_OF_TEXT, Tokenizer, looks_like_hub_id, train_bpe_tokenizer

PathLike = str | os.PathLike

#: Token files hold little-endian uint16, as llama2.c and nanoGPT write them on every machine they run on.
TOKEN_DTYPE = np.dtype("<u2")
_MAX_VOCAB = 1 << 16
_TEXT_SUFFIXES = (".txt", ".jsonl")
_JSONL_FIELDS = ("text", "story")
_SOURCE_HINT = "pass a local .txt, .jsonl or tokenized .bin file"
#: A .txt file whose first MiB has a line holding only <|endoftext|> separates documents by such lines (TinyStories'
#: own files do, and their stories may contain blank lines); any other .txt file separates them by blank lines.
_SNIFF_BYTES = 1 << 20
_EOT_LINE = END_OF_TEXT.encode()
_ENCODE_BATCH = 1024  # documents per tokenizer call: large enough for the Rust tokenizer's threads to pay off
_COPY_TOKENS = 1 << 22  # tokens per slice when splitting a token stream into two files
_DATASET_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------------
# Writing files


# ---------------------------------------------------------------------------------------------------------------------
# Text sources


def open_source(spec: str) -> Iterator[str]:
    """The documents of ``spec``, streamed: a ``.txt`` file (documents separated by blank lines, or by lines holding
    only ``<|endoftext|>``), a ``.jsonl`` file (a ``"text"`` or ``"story"`` string per line), a folder of those, or a
    Hugging Face dataset id, optionally with a file pattern: ``roneneldan/TinyStories:TinyStoriesV2-GPT4-train.txt``
    (only its .txt/.jsonl files are fetched)."""
    return _documents(resolve_source(spec))


def resolve_source(spec: str) -> list[Path]:
    """The local text files ``spec`` stands for, in reading order (a hub dataset is fetched first)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise OrionError(f"{path} holds no .txt or .jsonl files; {_SOURCE_HINT}, or a folder of them")
        return files
    if path.exists():
        if path.suffix == ".bin":
            raise OrionError(f"{path} is already tokenized: train on it directly (TokenFile / BatchStream); a text "
                             "source is a .txt or .jsonl file")
        if path.suffix not in _TEXT_SUFFIXES:
            raise OrionError(f"{path}: {path.suffix or 'no suffix'} is not a text format Orion reads; {_SOURCE_HINT} "
                             "(parquet is not read: convert it to .jsonl)")
        return [path]
    if not _is_hub_spec(spec):
        raise OrionError(f"no such file or folder: {path}; {_SOURCE_HINT}, or a hub dataset id such as "
                         "roneneldan/TinyStories")
    repo_id, _, pattern = spec.partition(":")
    return _hub_files(repo_id, pattern)


def _is_hub_spec(spec: str) -> bool:
    """``owner/name`` or ``owner/name:pattern`` that is not an existing local path."""
    repo_id = spec.partition(":")[0]
    return not Path(spec).expanduser().exists() and "/" in repo_id and looks_like_hub_id(repo_id)


def _hub_files(repo_id: str, pattern: str) -> list[Path]:
    """The .txt/.jsonl files of a hub dataset (those matching ``pattern`` if given), downloaded or from the cache."""
    patterns = [pattern] if pattern else [f"*{s}" for s in _TEXT_SUFFIXES]
    folder = _download_dataset(repo_id, patterns)
    # The snapshot folder is shared with earlier downloads of other files, so filter again.
    files = sorted(p for p in folder.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file()
                   and any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pat) for pat in patterns))
    if not files:
        wanted = f"files matching {pattern!r}" if pattern else "files"
        raise OrionError(f"dataset {repo_id!r} has no .txt or .jsonl {wanted} (Orion does not read parquet); pick its "
                         f"text file as {repo_id}:FILE.txt, or {_SOURCE_HINT}")
    return files


def _download_dataset(repo_id: str, patterns: list[str]) -> Path:
    """``huggingface_hub.snapshot_download`` of a dataset, every failure one short :class:`OrionError`."""
    def fail(reason: str) -> OrionError:
        return OrionError(f"could not fetch dataset {repo_id!r} from the Hugging Face hub ({reason}); {_SOURCE_HINT}")

    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise fail("the huggingface_hub package is not installed: pip install huggingface_hub") from None
    # HF_HUB_OFFLINE is read when huggingface_hub is imported; honour it when it is set later too.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns,
                                                      local_files_only=offline))
    except hub_errors.GatedRepoError:
        raise fail("the dataset is gated: accept its terms on the hub and log in with `hf auth login`") from None
    except hub_errors.RepositoryNotFoundError:
        raise fail("no such dataset, or it is private and you are not logged in") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        raise fail("offline or the hub is unreachable, and it is not in the local cache") from None
    except Exception as e:  # network stack, disk, anything else: the user gets one line, not a traceback
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        raise fail(f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__) from None


def _documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        yield from (_jsonl_documents(path) if path.suffix == ".jsonl" else _text_documents(path))


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its line ending), read lazily."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise OrionError(f"cannot read {path} ({e.strerror or e}); {_SOURCE_HINT}") from None
    with f:
        for number, raw in enumerate(f, 1):
            yield number, raw.rstrip(b"\r\n")


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OrionError(f"{path}, line {number}: not UTF-8 text (byte {e.start + 1} of the line); convert the file "
                         "to UTF-8") from None


def _text_documents(path: Path) -> Iterator[str]:
    lines = _lines(path)
    head: list[tuple[int, bytes]] = []
    size = 0
    by_eot = False
    for number, raw in lines:  # look ahead (at most 1 MiB) for an <|endoftext|> line to learn the separator
        head.append((number, raw))
        size += len(raw) + 1
        if raw.strip() == _EOT_LINE:
            by_eot = True
            break
        if size >= _SNIFF_BYTES:
            break
    document: list[str] = []
    for number, raw in itertools.chain(head, lines):
        if raw.strip() == _EOT_LINE or (not by_eot and not raw.strip()):
            text = "\n".join(document).strip()
            document = []
            if text:
                yield text
        else:
            document.append(_decode(path, number, raw))
    text = "\n".join(document).strip()
    if text:
        yield text


def _jsonl_documents(path: Path) -> Iterator[str]:
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(_decode(path, number, raw))
        except json.JSONDecodeError as e:
            raise OrionError(f"{where}: invalid JSON at column {e.colno} ({e.msg}); fix or remove the line") from None
        if not isinstance(record, dict):
            raise OrionError(f"{where}: a JSON {type(record).__name__}, expected an object with a \"text\" or "
                             "\"story\" field")
        text = next((record[k] for k in _JSONL_FIELDS if isinstance(record.get(k), str)), None)
        if text is None:
            raise OrionError(f"{where}: no \"text\" or \"story\" string field (keys: {', '.join(map(str, record))}); "
                             "each line must hold its document in one of them")
        if text.strip():
            yield text.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Token files


class TokenFile:
    """A flat uint16 token file (llama2.c / nanoGPT ``.bin``), memory-mapped: never read whole, sliced like an array."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise OrionError(f"cannot read token file {self.path} ({e.strerror or e}); make it with "
                             "tokenize_to_bin or prepare_dataset") from None
        if size == 0 or size % TOKEN_DTYPE.itemsize:
            raise OrionError(f"token file {self.path}: {size} bytes is not a whole, non-empty number of uint16 "
                             "tokens; the file is truncated or not a token file, so make it again")
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {len(self)} tokens)"


def tokenize_to_bin(documents: Iterable[str], tokenizer: Tokenizer, out_path: PathLike,
                    eos_id: int | None = None) -> int:
    """Tokenize ``documents`` into a uint16 token file, ``eos_id`` (default: the tokenizer's) after each document,
    written atomically; returns the number of tokens. Documents are streamed, a batch at a time."""
    eos = tokenizer.eos_id if eos_id is None else eos_id
    vocab = tokenizer.vocab_size
    if vocab > _MAX_VOCAB:
        raise SettingsError(f"the tokenizer has {vocab} tokens, more than the {_MAX_VOCAB} ids a uint16 token file "
                            f"can hold; use a vocabulary of at most {_MAX_VOCAB} (prepare_dataset(vocab_size=...))")
    if eos is None or isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or not 0 <= eos < vocab:
        raise SettingsError(f"end-of-text id {eos!r} is not a token id of this tokenizer (0 ... {vocab - 1}); pass "
                            "eos_id, or use a tokenizer whose tokenizer_config.json names its eos_token")
    count = 0
    it = iter([documents] if isinstance(documents, str) else documents)  # a lone string is one document, not many
    with atomic_write(out_path) as f:
        while batch := list(itertools.islice(it, _ENCODE_BATCH)):
            pieces: list[Iterable[int]] = []
            for ids in _encode_batch(tokenizer, batch):
                pieces += (ids, (int(eos),))
            flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64)
            f.write(flat.astype(TOKEN_DTYPE).tobytes())
            count += len(flat)
    return count


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: one parallel call for a Hugging Face tokenizer, else one ``encode`` per text."""
    encode_batch = getattr(getattr(tokenizer, "inner", None), "encode_batch", None)
    if type(tokenizer) is Tokenizer and encode_batch is not None:
        return [e.ids for e in encode_batch(texts)]
    return [tokenizer.encode(t) for t in texts]


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def _whole(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise SettingsError(f"{name} {value!r} must be a whole number >= {least}")
    return int(value)


class BatchStream:
    """Endless ``(inputs, targets)`` int64 batches ``[batch_size, seq_len]`` from a token file; ``targets`` is
    ``inputs`` shifted left by one token.

    Each epoch cuts the file into windows of ``seq_len + 1`` tokens overlapping by one. Shuffled (the default), the
    windows start at a random offset below ``seq_len`` and come in a random order, both drawn from a generator seeded
    by ``(seed, epoch)``, so every token is seen once per epoch and window edges move between epochs. Sequential,
    they come in file order from offset 0. The last windows that do not fill a whole batch are skipped.
    """

    def __init__(self, tokens: TokenFile | PathLike, batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True, epoch: int = 0, step: int = 0):
        self.tokens = tokens if isinstance(tokens, TokenFile) else TokenFile(tokens)
        self.batch_size = _whole("batch_size", batch_size, 1)
        self.seq_len = _whole("seq_len", seq_len, 1)
        self.seed = _whole("seed", seed, 0)
        self.shuffle = bool(shuffle)
        # Shuffled, the offset can be up to seq_len - 1, so count windows for the worst offset: every epoch has as many.
        usable = len(self.tokens) - 1 - (self.seq_len - 1 if self.shuffle else 0)
        self.batches_per_epoch = max(usable, 0) // self.seq_len // self.batch_size
        if self.batches_per_epoch == 0:
            raise OrionError(f"{self.tokens.path} has {len(self.tokens)} tokens, too few for one batch of "
                             f"{self.batch_size} windows of {self.seq_len} + 1 tokens; use more data or a smaller "
                             "batch_size / seq_len")
        self.epoch = _whole("epoch", epoch, 0)
        self.step = _whole("step", step, 0)
        if self.step >= self.batches_per_epoch:
            raise SettingsError(f"step {self.step} is past the end of an epoch ({self.batches_per_epoch} batches)")
        self._starts: tuple[int, np.ndarray] | None = None  # (epoch, window starts in batch order), the cached plan

    def _epoch_starts(self) -> np.ndarray:
        """The start token of every window of the current epoch, in the order they are served."""
        if self._starts is None or self._starts[0] != self.epoch:
            n = self.batches_per_epoch * self.batch_size
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                offset = int(rng.integers(self.seq_len))
                starts = offset + rng.permutation(n) * self.seq_len
            else:
                starts = np.arange(n) * self.seq_len
            self._starts = (self.epoch, starts)
        return self._starts[1]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self._epoch_starts()[self.step * self.batch_size:(self.step + 1) * self.batch_size]
        windows = np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def state(self) -> dict:
        """The stream's whole position as plain JSON-able values; :meth:`restore` continues from it exactly."""
        return {"path": str(self.tokens.path), "num_tokens": len(self.tokens), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "step": self.step}

    @classmethod
    def restore(cls, state: dict, tokens: TokenFile | PathLike | None = None) -> BatchStream:
        """The stream :meth:`state` describes, over ``tokens`` (default: the file the state names), which must hold
        as many tokens as the saved one did."""
        keys = ("path", "num_tokens", "batch_size", "seq_len", "seed", "shuffle", "epoch", "step")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
            raise SettingsError(f"not a BatchStream state: missing {', '.join(missing)}; pass what state() returned")
        stream = cls(state["path"] if tokens is None else tokens, state["batch_size"], state["seq_len"],
                     seed=state["seed"], shuffle=state["shuffle"], epoch=state["epoch"], step=state["step"])
        if len(stream.tokens) != state["num_tokens"]:
            raise OrionError(f"{stream.tokens.path} has {len(stream.tokens)} tokens but the saved stream read a file "
                             f"of {state['num_tokens']}; resume with the same token file")
        return stream


# ---------------------------------------------------------------------------------------------------------------------
# Preparing a dataset


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset folder: its token files, the tokenizer they were made with, and ``dataset.json``."""

    directory: Path
    train: Path
    val: Path
    tokenizer: Tokenizer
    info: dict

    @property
    def split_note(self) -> str | None:
        """What a user should know about the validation split when it is not whole documents, else None."""
        if self.info.get("split") != "tokens":
            return None
        n, fraction = self.info["documents"], self.info["val_fraction"]
        total = self.info["train_tokens"] + self.info["val_tokens"]
        return (f"{self.info['source']} has {n} document{'s' if n != 1 else ''}, too few to hold out "
                f"{fraction * 100:g}% of them for validation (that takes at least {_min_documents(fraction)} "
                f"documents; in a .txt file, blank lines separate them): split on its token stream instead, the last "
                f"{self.info['val_tokens']} of {total} tokens for validation")


def prepare_dataset(spec: str, out_dir: PathLike, tokenizer: Tokenizer | None = None, vocab_size: int = 4096,
                    val_fraction: float = 0.01, *, tokenizer_documents: int = 100_000) -> PreparedDataset:
    """Turn a text source (see :func:`open_source`) into ``train.bin`` / ``val.bin`` in ``out_dir``.

    Without ``tokenizer``, a byte-level BPE of ``vocab_size`` is trained on the first ``tokenizer_documents``
    documents and saved there as ``tokenizer.json``; a given tokenizer is saved there too, so the folder is
    self-contained. Every ``1 / val_fraction``-th document (the first included) goes to ``val.bin``; a source of
    fewer than ``1 / val_fraction`` documents (a text file with no blank lines is one document) cannot spare whole
    documents, so its token stream is split instead, as nanoGPT does: the last ``val_fraction`` of the tokens go to
    ``val.bin`` (``info["split"]`` says which, :attr:`PreparedDataset.split_note` explains it). ``dataset.json``
    records the settings, source files and token counts; when it still matches (a given tokenizer: when the folder's
    tokenizer is that one), the files are reused as they are.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise SettingsError(f"val_fraction {val_fraction!r} must be between 0 and 1 (e.g. 0.01)")
    _whole("tokenizer_documents", tokenizer_documents, 1)
    if tokenizer is None:
        _whole("vocab_size", vocab_size, 257)
    folder = Path(out_dir)
    files = None if _is_hub_spec(spec) else resolve_source(spec)
    wanted = {
        "format": _DATASET_FORMAT,
        "source": spec,
        # Local files are matched by size and modification time; a hub dataset by its id, so reuse works offline.
        "source_files": None if files is None else [_file_stamp(p) for p in files],
        "val_fraction": val_fraction,
        "tokenizer_source": ("trained", vocab_size, tokenizer_documents) if tokenizer is None
        else ("given", _fingerprint(tokenizer)),
    }
    wanted = json.loads(json.dumps(wanted))  # tuples become lists, as they read back from dataset.json
    reused = _reuse(folder, wanted, tokenizer)
    if reused is not None:
        return reused
    with contextlib.suppress(FileNotFoundError):
        (folder / "dataset.json").unlink()  # a crash while preparing must not leave an old, now false, record
    if files is None:
        files = resolve_source(spec)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(itertools.islice(_documents(files), tokenizer_documents), vocab_size, folder)
    else:
        _save_tokenizer(tokenizer, folder)
    tokenizer = Tokenizer.from_dir(folder)  # what a later run will load, so the token files match it exactly

    def split(val: bool) -> Iterator[str]:
        """Document i goes to val when ceil((i + 1) f) > ceil(i f): ceil(n f) of n documents, evenly spread."""
        for i, doc in enumerate(_documents(files)):
            if (math.ceil((i + 1) * val_fraction) > math.ceil(i * val_fraction)) == val:
                yield doc

    enough = _min_documents(val_fraction)
    documents = sum(1 for _ in itertools.islice(_documents(files), enough))  # stops reading once there are enough
    if documents >= enough:
        # Two passes over the text, one per split: reading it costs little next to tokenizing it.
        train_tokens = tokenize_to_bin(split(False), tokenizer, folder / "train.bin")
        val_tokens = tokenize_to_bin(split(True), tokenizer, folder / "val.bin")
        how = {"split": "documents"}
    else:
        train_tokens, val_tokens = _split_token_stream(_documents(files), tokenizer, folder, val_fraction)
        how = {"split": "tokens", "documents": documents}
    if train_tokens == 0 or val_tokens == 0:
        raise OrionError(f"{spec} gave {train_tokens} training and {val_tokens} validation tokens: too little text "
                         "to train on; use a larger corpus")
    info = {**wanted, "tokenizer": _tokenizer_file(folder).name, "tokenizer_sha256": _sha256(_tokenizer_file(folder)),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "train_tokens": train_tokens,
            "val_tokens": val_tokens, **how}
    with atomic_write(folder / "dataset.json") as f:
        f.write((json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return PreparedDataset(folder, folder / "train.bin", folder / "val.bin", tokenizer, info)


def _reuse(folder: Path, wanted: dict, tokenizer: Tokenizer | None) -> PreparedDataset | None:
    """The dataset already in ``folder`` if its dataset.json has the wanted settings and its files are intact. A given
    tokenizer need only be the folder's (a resumed run passes the checkpoint's copy of the tokenizer trained here)."""
    try:
        info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    settings = [k for k in wanted if k != "tokenizer_source" or tokenizer is None]
    if not isinstance(info, dict) or any(info.get(k) != wanted[k] for k in settings):
        return None
    tokenizer_file = folder / str(info.get("tokenizer"))
    for name, key in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")):
        try:
            if (folder / name).stat().st_size != TOKEN_DTYPE.itemsize * info.get(key, -1):
                return None
        except (OSError, TypeError):
            return None
    if not tokenizer_file.is_file() or _sha256(tokenizer_file) != info.get("tokenizer_sha256"):
        return None
    held = Tokenizer.from_dir(folder)
    if tokenizer is not None and _fingerprint(held) != _fingerprint(tokenizer):
        return None
    return PreparedDataset(folder, folder / "train.bin", folder / "val.bin", held, info)


def _min_documents(val_fraction: float) -> int:
    """Fewer documents than this cannot hold out ``val_fraction`` of them: one would be more than that share."""
    return math.ceil(1 / val_fraction)


def _split_token_stream(documents: Iterable[str], tokenizer: Tokenizer, folder: Path,
                        val_fraction: float) -> tuple[int, int]:
    """Tokenize ``documents`` as one stream, then its first tokens become train.bin and the last ``ceil(n f)`` val.bin
    (nanoGPT's split of a text); returns both counts. Copied in slices, so memory stays small however long it is."""
    stream = folder / "stream.bin"
    try:
        total = tokenize_to_bin(documents, tokenizer, stream)
        if total == 0:
            return 0, 0
        tokens = TokenFile(stream)
        boundary = total - math.ceil(total * val_fraction)
        for name, start, stop in (("train.bin", 0, boundary), ("val.bin", boundary, total)):
            with atomic_write(folder / name) as f:
                for first in range(start, stop, _COPY_TOKENS):
                    f.write(tokens[first:min(first + _COPY_TOKENS, stop)].tobytes())
        return boundary, total - boundary
    finally:
        with contextlib.suppress(FileNotFoundError):
            stream.unlink()


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _serialized(tokenizer: Tokenizer) -> tuple[str, bytes]:
    """(file name, bytes) that :meth:`Tokenizer.from_dir` reads back as this tokenizer."""
    inner = tokenizer.inner
    if hasattr(inner, "to_str"):  # a Hugging Face tokenizers.Tokenizer
        return "tokenizer.json", inner.to_str().encode("utf-8")
    if hasattr(inner, "serialized_model_proto"):  # a SentencePiece processor
        return "tokenizer.model", inner.serialized_model_proto()
    raise OrionError(f"cannot save a {type(inner).__name__} tokenizer into the dataset folder; pass an "
                     "orion.models.hub.Tokenizer loaded with Tokenizer.from_dir")


def _fingerprint(tokenizer: Tokenizer) -> str:
    name, data = _serialized(tokenizer)
    return f"{name}:{hashlib.sha256(data).hexdigest()}:eos={tokenizer.eos_id}"


def _save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """The tokenizer's own file plus a tokenizer_config.json naming its end-of-text token."""
    if tokenizer.eos_id is None:
        raise SettingsError("the tokenizer has no end-of-text token, which separates documents in the token files; "
                            "use a tokenizer whose tokenizer_config.json names its eos_token")
    files = tokenizer_files(tokenizer)
    for stale in {"tokenizer.json", "tokenizer.model"} - set(files):  # Tokenizer.from_dir prefers tokenizer.json
        with contextlib.suppress(FileNotFoundError):
            (folder / stale).unlink()
    for name, data in files.items():
        with atomic_write(folder / name) as f:
            f.write(data)


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files :meth:`Tokenizer.from_dir` reads back as this tokenizer: its own file, and a tokenizer_config.json
    naming its end-of-text token (if it has one)."""
    name, data = _serialized(tokenizer)
    files = {name: data}
    if tokenizer.eos_id is not None:
        config = {"eos_token": tokenizer.id_to_token(tokenizer.eos_id)}
        files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    return files


def _tokenizer_file(folder: Path) -> Path:
    json_file = folder / "tokenizer.json"
    return json_file if json_file.is_file() else folder / "tokenizer.model"
