"""Training data: the generated story corpus, text sources (never online), uint16 token files, reproducible and
exactly resumable batches, and idempotent dataset preparation."""

from __future__ import annotations

import json
import math
import re
import tracemalloc

import numpy as np
import pytest

import orion.train.data as data
from orion.errors import OrionError, SettingsError
from orion.models.hub import Tokenizer, train_bpe_tokenizer
from orion.train.corpus import make_story_corpus, write_corpus
from orion.train.data import BatchStream, TokenFile, open_source, prepare_dataset, tokenize_to_bin

huggingface_hub = pytest.importorskip("huggingface_hub")

HINT = "pass a local .txt, .jsonl or tokenized .bin file"


@pytest.fixture(scope="module")
def stories():
    return make_story_corpus(300, seed=7)


@pytest.fixture(scope="module")
def tokenizer(stories, tmp_path_factory):
    return train_bpe_tokenizer(stories, 400, tmp_path_factory.mktemp("tok"))



def split_at(ids: np.ndarray, eos: int) -> list[list[int]]:
    """Token ids cut into documents at each end-of-text id (the last document ends with one)."""
    docs, current = [], []
    for t in ids.tolist():
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert current == []
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# The generated corpus


def test_corpus_is_deterministic_per_seed_and_varied():
    a = make_story_corpus(400, seed=3)
    assert a == make_story_corpus(400, seed=3)
    assert make_story_corpus(100, seed=3) == a[:100]  # more stories extend the corpus, never change it
    assert len(set(a)) == 400
    other = make_story_corpus(400, seed=4)
    assert len(set(a) & set(other)) < 5
    words = {w for s in a for w in re.findall(r"[a-z']+", s.lower())}
    assert 200 <= len(words) <= 1000  # a few hundred distinct words
    openings = {s.split(".")[0] for s in a}
    assert len(openings) > 100


def test_stories_have_beginning_middle_and_end():
    for story in make_story_corpus(100, seed=1):
        beginning, middle, end = story.split("\n")
        assert beginning.startswith("Once upon a time, there was")
        name = re.search(r"named (\w+)\.", beginning).group(1)
        assert name in middle and re.search(r"\bBut\b", middle)
        assert story.endswith(".") and "\n\n" not in story and "{" not in story


def test_corpus_arguments():
    assert make_story_corpus(0) == []
    with pytest.raises(SettingsError, match="n_stories"):
        make_story_corpus(-1)


def test_write_corpus_reads_back_as_the_same_documents(tmp_path):
    stories = make_story_corpus(50)
    write_corpus(tmp_path / "c.txt", stories)
    assert list(open_source(str(tmp_path / "c.txt"))) == stories
    with pytest.raises(OrionError, match="story 1 .*blank line"):
        write_corpus(tmp_path / "bad.txt", ["fine", "one\n\ntwo"])
    assert not (tmp_path / "bad.txt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Text sources


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\n\nfirst line\r\nsecond line\r\n\r\n  \n\nsecond doc\n\n\nthird \xc3\xa9\n")
    assert list(open_source(str(path))) == ["first line\nsecond line", "second doc", "third \u00e9"]


def test_txt_with_endoftext_lines_keeps_blank_lines_inside_documents(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Once there was a cat.\n\nThe cat slept.\n<|endoftext|>\nA dog ran.\n <|endoftext|> \n\nEnd.\n")
    assert list(open_source(str(path))) == ["Once there was a cat.\n\nThe cat slept.", "A dog ran.", "End."]


def test_txt_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\n\nalso fine\ncaf\xe9\n")
    with pytest.raises(OrionError, match=r"latin1.txt, line 4: not UTF-8"):
        list(open_source(str(path)))


def test_jsonl_reads_text_or_story(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"text": " one "}, {"story": "two\nlines", "id": 3}, {"text": ""}, {"text": 5, "story": "four"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    assert list(open_source(str(path))) == ["one", "two\nlines", "four"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"line 3: invalid JSON"),
    ('["text"]', r"line 3: a JSON list"),
    ('{"title": "no text"}', r"line 3: no \"text\" or \"story\" string field \(keys: title\)"),
])
def test_bad_jsonl_line_names_its_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"story": "b"}\n' + line + '\n{"text": "d"}\n')
    docs = open_source(str(path))
    assert next(docs) == "a" and next(docs) == "b"  # lines before the bad one are served: it streams
    with pytest.raises(OrionError, match=message):
        next(docs)


def test_folder_reads_its_text_files_in_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("b1\n\nb2\n")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c1\n")
    (tmp_path / "notes.md").write_text("not a source\n")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("hidden\n")
    assert list(open_source(str(tmp_path))) == ["a1", "b1", "b2", "c1"]


@pytest.mark.parametrize("name, content, message", [
    ("empty", None, "holds no .txt or .jsonl files"),
    ("train.bin", b"\0\0", "already tokenized"),
    ("data.parquet", b"PAR1", r"\.parquet is not a text format"),
])
def test_sources_orion_does_not_read(tmp_path, name, content, message, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("must not download"))
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(OrionError, match=message):
        open_source(str(path))


@pytest.mark.parametrize("spec", ["missing.txt", "./missing/file.txt", "/no/such/dir", "TinyStories"])
def test_missing_path_that_is_no_hub_id(spec, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(OrionError, match="no such file or folder"):
        open_source(spec)


def test_a_large_txt_file_is_streamed_with_little_memory(tmp_path):
    path = tmp_path / "big.txt"
    doc = ("word " * 400 + "\n") * 2 + "\n"  # ~4 kB documents
    n = 50_000_000 // len(doc)
    with open(path, "w") as f:
        for _ in range(n // 1000):
            f.write(doc * 1000)
    assert path.stat().st_size > 45_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in open_source(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n // 1000 * 1000
    assert peak < 4_000_000  # a 1 MiB look-ahead and a document, never the 50 MB file


# ---------------------------------------------------------------------------------------------------------------------
# Hub datasets (never online)


def test_hub_dataset_fetches_only_text_files(tmp_path, monkeypatch, no_network):
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "TinyStories-train.txt").write_text("s1\n<|endoftext|>\ns2\n")
    (snapshot / "data" / "extra.jsonl").write_text('{"text": "j1"}\n')
    (snapshot / "data" / "train.parquet").write_bytes(b"PAR1")
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert list(open_source("roneneldan/TinyStories")) == ["s1", "s2", "j1"]
    assert list(open_source("roneneldan/TinyStories:TinyStories-train.txt")) == ["s1", "s2"]
    assert [c[0] for c in calls] == ["roneneldan/TinyStories"] * 2
    assert all(c[1]["repo_type"] == "dataset" for c in calls)
    assert calls[0][1]["allow_patterns"] == ["*.txt", "*.jsonl"]
    assert calls[1][1]["allow_patterns"] == ["TinyStories-train.txt"]
    with pytest.raises(OrionError, match="has no .txt or .jsonl files matching 'data/\\*.parquet'"):
        open_source("roneneldan/TinyStories:data/*.parquet")
    assert no_network == []


def _hub_errors():
    import httpx2
    from huggingface_hub import errors as E

    not_found = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/datasets/x/y"))
    return [
        (E.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), "offline"),
        (E.OfflineModeIsEnabled("offline mode is enabled"), "offline"),
        (E.RepositoryNotFoundError("404 Client Error", response=not_found), "no such dataset"),
        (ConnectionError("Connection reset by peer\ntraceback detail"), "ConnectionError: Connection reset by peer"),
    ]


@pytest.mark.parametrize("error, reason", _hub_errors(), ids=lambda v: type(v).__name__ if isinstance(v, Exception)
                         else None)
def test_hub_failure_is_one_clear_error(error, reason, monkeypatch):
    def fake(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(OrionError) as info:
        open_source("roneneldan/TinyStories")
    message = str(info.value)
    assert message.startswith("could not fetch dataset 'roneneldan/TinyStories' from the Hugging Face hub (")
    assert message.endswith(HINT) and reason in message and "\n" not in message
    assert info.value.__suppress_context__


def test_hf_hub_offline_with_the_real_client(monkeypatch, tmp_path, no_network):
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: real(*a, cache_dir=tmp_path, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OrionError, match=r"^could not fetch dataset 'roneneldan/TinyStories' .*\(offline"):
        open_source("roneneldan/TinyStories")
    assert no_network == []


# ---------------------------------------------------------------------------------------------------------------------
# Token files


def test_token_file_maps_a_uint16_file(tmp_path, rng):
    ids = rng.integers(0, 65536, size=10_001).astype("<u2")
    ids.tofile(tmp_path / "t.bin")
    tokens = TokenFile(tmp_path / "t.bin")
    assert isinstance(tokens.tokens, np.memmap) and len(tokens) == 10_001
    np.testing.assert_array_equal(tokens[:], ids)
    np.testing.assert_array_equal(tokens[123:4567], ids[123:4567])
    np.testing.assert_array_equal(tokens[[5, 0, 10_000]], ids[[5, 0, 10_000]])
    assert tokens[-1] == ids[-1]


@pytest.mark.parametrize("content, message", [(b"", "0 bytes"), (b"\1\0\2", "3 bytes"), (None, "cannot read")])
def test_token_file_refuses_what_is_no_token_file(tmp_path, content, message):
    path = tmp_path / "t.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(OrionError, match=message):
        TokenFile(path)


def test_tokenize_to_bin_round_trip(tokenizer, stories, tmp_path):
    docs = stories * 4 + ["Caf\u00e9 \U0001f389 and \u4f60\u597d", "x"]  # > 1024 documents: more than one batch
    count = tokenize_to_bin(iter(docs), tokenizer, tmp_path / "t.bin")
    tokens = TokenFile(tmp_path / "t.bin")
    assert count == len(tokens) == sum(len(tokenizer.encode(d)) + 1 for d in docs)
    eos = tokenizer.eos_id
    assert eos == tokenizer.token_to_id("<|endoftext|>") and tokens[-1] == eos
    pieces = split_at(np.asarray(tokens[:]), eos)
    assert [tokenizer.decode(p) for p in pieces] == docs
    assert pieces == [tokenizer.encode(d) for d in docs]


class FakeTokenizer:
    """Duck-typed tokenizer: each character's code point is its id."""

    def __init__(self, vocab_size, eos_id=0):
        self.vocab_size, self.eos_id = vocab_size, eos_id

    def encode(self, text):
        return [ord(c) for c in text]


def test_largest_uint16_vocab_is_accepted_and_a_larger_one_refused(tmp_path):
    assert tokenize_to_bin(["\uffff\u0001"], FakeTokenizer(65536, eos_id=65535), tmp_path / "a.bin") == 3
    assert TokenFile(tmp_path / "a.bin")[:].tolist() == [65535, 1, 65535]
    with pytest.raises(SettingsError, match="70000 tokens, more than the 65536"):
        tokenize_to_bin(["a"], FakeTokenizer(70000), tmp_path / "b.bin")
    for eos in (None, 300, -1):
        with pytest.raises(SettingsError, match="end-of-text id"):
            tokenize_to_bin(["a"], FakeTokenizer(300, eos_id=eos), tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()


def test_tokenize_to_bin_is_atomic(tmp_path):
    path = tmp_path / "t.bin"
    tokenize_to_bin(["old"], FakeTokenizer(300), path)
    before = path.read_bytes()

    def failing():
        yield "fine"
        raise OrionError("source broke")

    with pytest.raises(OrionError, match="source broke"):
        tokenize_to_bin(failing(), FakeTokenizer(300), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------------------------
# Batches


@pytest.fixture
def positions(tmp_path):
    """A token file whose every token is its own position, so a batch shows where it was read."""
    np.arange(1000, dtype="<u2").tofile(tmp_path / "pos.bin")
    return TokenFile(tmp_path / "pos.bin")


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_are_windows_and_targets_are_inputs_shifted(positions, shuffle):
    stream = BatchStream(positions, batch_size=3, seq_len=16, shuffle=shuffle, seed=5)
    for x, y in take(stream, 2 * stream.batches_per_epoch):
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(16))  # contiguous windows of the file
        np.testing.assert_array_equal(y, x + 1)
        assert y.max() < len(positions)


def test_a_shuffled_epoch_reads_every_window_once(positions):
    stream = BatchStream(positions, batch_size=4, seq_len=10, seed=1)
    # Worst-case offset 9: windows of 11 tokens starting at 9, 19, ... must fit in 1000 tokens: 99 windows, 24 batches.
    assert stream.batches_per_epoch == (1000 - 1 - 9) // 10 // 4 == 24
    epochs = []
    for _ in range(3):
        starts = np.concatenate([x[:, 0] for x, _ in take(stream, stream.batches_per_epoch)])
        epochs.append(starts.tolist())
        assert len(set(starts.tolist())) == len(starts) == 96
        offset = int(starts.min())
        assert offset < 10 and set((starts - offset) % 10) == {0}
        assert not np.array_equal(starts, np.sort(starts))  # shuffled
    assert (stream.epoch, stream.step) == (3, 0)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # a new order each epoch
    offsets = {int(next(BatchStream(positions, 4, 10, seed=1, epoch=e))[0][0, 0]) % 10 for e in range(10)}
    assert len(offsets) > 1  # window edges move between epochs


def test_sequential_batches_come_in_file_order(positions):
    stream = BatchStream(positions, batch_size=2, seq_len=100, shuffle=False)
    assert stream.batches_per_epoch == 4
    starts = [x[:, 0].tolist() for x, _ in take(stream, 5)]
    assert starts == [[0, 100], [200, 300], [400, 500], [600, 700], [0, 100]]


def test_same_seed_same_batches_other_seed_other_batches(positions):
    def first(seed):
        return np.stack([x for x, _ in take(BatchStream(positions, 2, 8, seed=seed), 20)])

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("split", [0, 1, 4, 7, 9])
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(positions, shuffle, split):
    make = lambda: BatchStream(positions, batch_size=5, seq_len=50, seed=11, shuffle=shuffle)  # noqa: E731
    assert make().batches_per_epoch == 3  # 10 batches cross three epoch boundaries
    straight = take(make(), 10)
    first = make()
    before = take(first, split)
    state = json.loads(json.dumps(first.state()))
    after = take(BatchStream.restore(state), 10 - split)
    for (x, y), (x2, y2) in zip(straight, before + after, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_restore_checks_the_state_and_the_file(positions, tmp_path):
    state = BatchStream(positions, 2, 8).state()
    with pytest.raises(SettingsError, match="missing step"):
        BatchStream.restore({k: v for k, v in state.items() if k != "step"})
    np.arange(500, dtype="<u2").tofile(tmp_path / "other.bin")
    with pytest.raises(OrionError, match="has 500 tokens but the saved stream read a file of 1000"):
        BatchStream.restore(state, tmp_path / "other.bin")


def test_batch_settings_are_checked(positions):
    with pytest.raises(OrionError, match="1000 tokens, too few for one batch of 10 windows of 100 \\+ 1"):
        BatchStream(positions, batch_size=10, seq_len=100)
    for kwargs in ({"batch_size": 0, "seq_len": 8}, {"batch_size": 2, "seq_len": 2.5},
                   {"batch_size": 2, "seq_len": 8, "seed": -1}, {"batch_size": 2, "seq_len": 8, "step": 999}):
        with pytest.raises(SettingsError):
            BatchStream(positions, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# prepare_dataset


def test_prepare_dataset_from_text(stories, tmp_path):
    write_corpus(tmp_path / "c.txt", stories)
    ds = prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "out", vocab_size=400, val_fraction=0.1)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"train.bin", "val.bin", "dataset.json", "tokenizer.json",
                                               "tokenizer_config.json"}
    info = json.loads((out / "dataset.json").read_text())
    assert info == ds.info and info["tokenizer"] == "tokenizer.json" and info["vocab_size"] == 400
    train, val = TokenFile(ds.train), TokenFile(ds.val)
    assert (len(train), len(val)) == (info["train_tokens"], info["val_tokens"])
    tok = Tokenizer.from_dir(out)
    assert info["eos_id"] == tok.eos_id == tok.token_to_id("<|endoftext|>")
    # Every 10th story, the first included, is validation; the rest is training, each in order.
    assert [tok.decode(d) for d in split_at(np.asarray(val[:]), tok.eos_id)] == stories[::10]
    expected_train = [s for i, s in enumerate(stories) if i % 10]
    assert [tok.decode(d) for d in split_at(np.asarray(train[:]), tok.eos_id)] == expected_train
    assert len(val) + len(train) == sum(len(tok.encode(s)) + 1 for s in stories)


def test_prepare_dataset_is_idempotent(stories, tmp_path, monkeypatch):
    source = tmp_path / "c.txt"
    write_corpus(source, stories[:100])
    out = tmp_path / "out"
    first = prepare_dataset(str(source), out, vocab_size=300)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def forbidden(*args, **kwargs):
        raise AssertionError("must reuse the prepared files")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_to_bin", forbidden)
        m.setattr(data, "train_bpe_tokenizer", forbidden)
        again = prepare_dataset(str(source), out, vocab_size=300)
    assert again.info == first.info and again.tokenizer.vocab_size == first.tokenizer.vocab_size
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # Each change of settings, source or files makes it prepare again.
    changed = prepare_dataset(str(source), out, vocab_size=300, val_fraction=0.02)
    assert changed.info["val_fraction"] == 0.02 and changed.info["val_tokens"] > first.info["val_tokens"]
    write_corpus(source, stories[:120])
    grown = prepare_dataset(str(source), out, vocab_size=300, val_fraction=0.02)
    assert grown.info["train_tokens"] > changed.info["train_tokens"]
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    repaired = prepare_dataset(str(source), out, vocab_size=300, val_fraction=0.02)
    assert len(TokenFile(repaired.train)) == grown.info["train_tokens"]


def test_prepare_dataset_with_a_given_tokenizer(tokenizer, stories, tmp_path, monkeypatch):
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"story": s}) + "\n" for s in stories[:50]))
    monkeypatch.setattr(data, "train_bpe_tokenizer", lambda *a, **k: pytest.fail("must use the given tokenizer"))
    ds = prepare_dataset(str(source), tmp_path / "out", tokenizer=tokenizer, val_fraction=0.05)
    assert ds.info["vocab_size"] == tokenizer.vocab_size and ds.info["eos_id"] == tokenizer.eos_id
    loaded = Tokenizer.from_dir(tmp_path / "out")  # the folder is self-contained
    assert loaded.encode(stories[0]) == tokenizer.encode(stories[0]) and loaded.eos_id == tokenizer.eos_id
    n_val = math.ceil(50 * 0.05)
    assert np.count_nonzero(TokenFile(ds.val)[:] == tokenizer.eos_id) == n_val
    assert np.count_nonzero(TokenFile(ds.train)[:] == tokenizer.eos_id) == 50 - n_val


def test_prepare_dataset_from_the_hub_is_reused_offline(stories, tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    write_corpus(snapshot / "train.txt", stories[:60])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    first = prepare_dataset("someone/stories", tmp_path / "out", vocab_size=300)
    assert first.info["source"] == "someone/stories" and first.info["source_files"] is None

    def offline(repo_id, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert prepare_dataset("someone/stories", tmp_path / "out", vocab_size=300).info == first.info


def one_sentence_per_line(stories: list[str]) -> str:
    """A corpus as many are kept: one sentence per line, no blank lines, so the whole file is one document."""
    return "".join(s + ".\n" for story in stories for s in story.replace("\n", " ").split(". ") if s)


def test_a_file_of_too_few_documents_is_split_on_its_token_stream(stories, tokenizer, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text(one_sentence_per_line(stories[:40]))
    assert len(list(open_source(str(source)))) == 1
    ds = prepare_dataset(str(source), tmp_path / "out", tokenizer=tokenizer, val_fraction=0.05)
    assert ds.info["split"] == "tokens" and ds.info["documents"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # the whole stream was a temporary file
        "dataset.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    # nanoGPT's split: the stream's first tokens train, its last ceil(n f) validate; nothing shared, nothing lost
    total = tokenize_to_bin(open_source(str(source)), tokenizer, tmp_path / "stream.bin")
    stream = np.asarray(TokenFile(tmp_path / "stream.bin")[:])
    train, val = np.asarray(TokenFile(ds.train)[:]), np.asarray(TokenFile(ds.val)[:])
    assert len(val) == math.ceil(total * 0.05) == ds.info["val_tokens"] and len(train) == ds.info["train_tokens"]
    assert np.array_equal(train, stream[:len(train)]) and np.array_equal(val, stream[len(train):])
    assert len(train) + len(val) == total
    note = ds.split_note
    assert "notes.txt has 1 document, too few" in note and "5% of them for validation" in note
    assert "at least 20 documents" in note and "split on its token stream" in note
    assert f"the last {len(val)} of {total} tokens" in note
    # the same source gives the same files, and a prepared folder is reused
    again = prepare_dataset(str(source), tmp_path / "again", tokenizer=tokenizer, val_fraction=0.05)
    assert again.train == tmp_path / "again" / "train.bin" and again.train.read_bytes() == ds.train.read_bytes()
    assert again.val == tmp_path / "again" / "val.bin" and again.val.read_bytes() == ds.val.read_bytes()
    assert prepare_dataset(str(source), tmp_path / "out", tokenizer=tokenizer, val_fraction=0.05).info == ds.info


@pytest.mark.parametrize("documents, split", [(19, "tokens"), (20, "documents")])
def test_documents_are_split_whole_from_one_per_validation_share(stories, tokenizer, tmp_path, documents, split):
    """With val_fraction 0.05, 20 documents hold out one; 19 cannot, so their token stream is split."""
    write_corpus(tmp_path / "c.txt", stories[:documents])
    ds = prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer=tokenizer, val_fraction=0.05)
    assert ds.info["split"] == split
    eos_in_val = np.count_nonzero(TokenFile(ds.val)[:] == tokenizer.eos_id)
    if split == "documents":
        assert eos_in_val == 1 and ds.split_note is None
        assert tokenizer.decode(TokenFile(ds.val)[:-1].tolist()) == stories[0]
    else:
        assert ds.info["documents"] == 19 and "has 19 documents" in ds.split_note
        assert ds.info["val_tokens"] == math.ceil(0.05 * (ds.info["train_tokens"] + ds.info["val_tokens"]))


def test_prepare_dataset_needs_text(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(OrionError, match="gave 0 training and 0 validation tokens: too little text"):
        prepare_dataset(str(tmp_path / "empty.txt"), tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out" / "dataset.json").exists()
    with pytest.raises(SettingsError, match="val_fraction"):
        prepare_dataset(str(tmp_path / "empty.txt"), tmp_path / "out", val_fraction=1.0)


def test_a_given_tokenizer_reuses_a_folder_made_with_that_tokenizer(stories, tokenizer, tmp_path, monkeypatch):
    """A resumed run passes the checkpoint's copy of the tokenizer a fresh run trained: the folder is reused."""
    write_corpus(tmp_path / "c.txt", stories[:120])
    first = prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "out", vocab_size=300)
    copy = Tokenizer.from_dir(tmp_path / "out")
    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_to_bin", lambda *a, **k: pytest.fail("must reuse the prepared files"))
        assert prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer=copy).info == first.info
    other = prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer=tokenizer)
    assert other.info["tokenizer_source"][0] == "given" and other.tokenizer.vocab_size == tokenizer.vocab_size
