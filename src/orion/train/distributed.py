"""Data-parallel training over torch.distributed: several processes (ranks), each with its own block programs on its
own backend, train one model by summing their weight gradients with gloo before every (identical) AdamW step.

Launched the standard way, ``torchrun --nproc-per-node N [--nnodes M ...] $(which orion) train ...``: each rank reads
the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks no
device: a Mac has one Neural Engine, which the ranks on it share). torch is the optional extra
``orion-ane[distributed]``, imported only here and only by a run launched that way.

What makes N ranks the same run as one process: every rank draws the same global batches from the same seeded stream
and trains on its own rows of each (``rows``), so the shards never overlap and the stream's position, saved by rank
0 alone, resumes every rank exactly; every rank scales its gradients by the global token count, so the all-reduced
sum is the global mean; and every decision taken from the gradients (skip on overflow, the loss scale) is agreed by
an all-reduce, so the ranks' weights never diverge.

The gradients live in a few flat float32 buffers (``GradientBuckets``), one per group of arrays that become final
together (each block, then the rest); a block's buffer is all-reduced asynchronously as soon as the engine's worker
thread has added its last gradients, while the backend runs the next block's backward program.

A rank that dies makes the others' next collective fail (gloo sees the closed connection) or time out (``timeout``);
each survivor then leaves a note in the rendezvous store, waits ``NOTE_GRACE_S`` for the other survivors' notes, and
stops with an error naming the ranks that left none (the dead ones) or the error a failed rank left.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta

import numpy as np

from orion.errors import OrionError, SettingsError

#: The optional extra that brings torch for multi-process training.
EXTRA = "orion-ane[distributed]"

#: Seconds a collective waits for the other ranks before the run stops (a save on rank 0 must fit in it).
DEFAULT_TIMEOUT_S = 300.0

#: Seconds a rank that saw a collective fail waits for the other survivors to say so, before naming the silent ones.
NOTE_GRACE_S = 2.0

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(OrionError):
    """A multi-process run that cannot go on: a rank died or timed out, or the ranks disagree."""


def launched() -> bool:
    """Whether this process is one rank of several, as torchrun launches them (``WORLD_SIZE`` above 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _torch_distributed():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise SettingsError(f"training on several processes needs torch: pip install '{EXTRA}' ({err})") from None
    if not dist.is_available():
        raise SettingsError(f"this torch ({torch.__version__}) was built without torch.distributed; install a build "
                            f"that has it: pip install '{EXTRA}'")
    return torch, dist


def _environment() -> dict[str, str]:
    missing = [name for name in _ENV if not os.environ.get(name)]
    if missing:
        raise SettingsError(f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                            "launch the ranks with torchrun (torchrun --nproc-per-node N $(which orion) train ...)")
    env = {name: os.environ[name] for name in _ENV}
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        if not env[name].isdigit():
            raise SettingsError(f"{name}={env[name]!r} is not a whole number; launch the ranks with torchrun")
    if not int(env["RANK"]) < int(env["WORLD_SIZE"]):
        raise SettingsError(f"RANK={env['RANK']} is not below WORLD_SIZE={env['WORLD_SIZE']}")
    return env


def _first_line(err: BaseException) -> str:
    """gloo's messages carry a source path and advice over several lines; the first sentence is the news."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip()).split("\n")[0]
    return text.split(". ")[0].rstrip(".")


class ProcessGroup:
    """This rank's membership of the run: who it is, the gloo group, and the rendezvous store for failure notes.

    ``with ProcessGroup.from_environment(timeout) as group:`` joins (every rank must) and, leaving on an error,
    leaves that error in the store for the other ranks to name; leaving normally, it tears the group down."""

    def __init__(self, rank: int, world_size: int, store, timeout_s: float):
        self.torch, self.dist = _torch_distributed()
        self.rank, self.world_size = rank, world_size
        self.timeout_s = float(timeout_s)
        self.notes = self.dist.PrefixStore("orion", store)
        self.step = 0  # the step being trained, for error messages
        self.dist.init_process_group("gloo", store=self.dist.PrefixStore("gloo", store), rank=rank,
                                     world_size=world_size, timeout=timedelta(seconds=self.timeout_s))

    @classmethod
    def from_environment(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessGroup:
        """Join the run torchrun's variables describe (the store at MASTER_ADDR:MASTER_PORT: torchrun's own agent
        store, or one rank 0 hosts when the ranks were started some other way)."""
        if not timeout_s > 0:
            raise SettingsError(f"--dist-timeout must be positive, got {timeout_s}")
        env = _environment()
        _, dist = _torch_distributed()
        url = f"env://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        try:
            store, rank, world_size = next(iter(dist.rendezvous(
                url, int(env["RANK"]), int(env["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))))
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"rank {env['RANK']} could not reach the rendezvous at {env['MASTER_ADDR']}:"
                                   f"{env['MASTER_PORT']} within {timeout_s:g} s ({_first_line(err)})") from None
        return cls(rank, world_size, store, timeout_s)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            with contextlib.suppress(RuntimeError):
                self.dist.destroy_process_group()
        elif not isinstance(error, DistributedError):  # this rank's own failure: the others name it with this
            with contextlib.suppress(RuntimeError):
                self.notes.set(f"failed/{self.rank}", f"stopped: {error}" if str(error) else type(error).__name__)

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes checkpoints and metrics."""
        return self.rank == 0

    # -- data -----------------------------------------------------------------------------------------------------

    def rows(self, batch: int) -> range:
        return rank_rows(batch, self.rank, self.world_size)

    @contextlib.contextmanager
    def rank0_first(self, what: str) -> Iterator[None]:
        """Rank 0 runs the body (preparing the data), then the others: they reuse what it wrote."""
        if self.rank != 0:
            self._barrier(f"waiting for rank 0 while {what}")
        yield
        if self.rank == 0:
            self._barrier(f"after {what}")

    # -- collectives ----------------------------------------------------------------------------------------------

    def any(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        value = self.torch.tensor([1 if flag else 0], dtype=self.torch.int32)
        with self._collective(what):
            self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return bool(value.item())

    def any_overflow(self, found: bool) -> bool:
        """``guarded_step``'s agreement: a non-finite value on any rank makes every rank skip the step."""
        return self.any(found, "agreeing on an overflow")

    def total(self, value: float, what: str) -> float:
        """The sum of ``value`` over the ranks, in float64."""
        tensor = self.torch.tensor([value], dtype=self.torch.float64)
        with self._collective(what):
            self.dist.all_reduce(tensor)
        return float(tensor.item())

    def same(self, value: int, what: str) -> None:
        """Refuse to go on unless every rank holds the same ``value`` (an integer such as a step)."""
        low = self.torch.tensor([value], dtype=self.torch.int64)
        high = low.clone()
        with self._collective(f"comparing {what}"):
            self.dist.all_reduce(low, op=self.dist.ReduceOp.MIN)
            self.dist.all_reduce(high, op=self.dist.ReduceOp.MAX)
        if low.item() != high.item():
            raise DistributedError(f"rank {self.rank} of {self.world_size} has {what} {value}, but another rank has "
                                   f"{int(low.item()) if value != low.item() else int(high.item())}")

    def _barrier(self, what: str) -> None:
        self.any(False, what)  # a barrier whose failure is reported like any collective's

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # gloo: a closed connection or a timeout (torch's DistBackendError)
            raise self._failure(what, err) from None

    def _failure(self, what: str, err: BaseException) -> DistributedError:
        """The error this rank stops with after a collective failed: which ranks stopped, from the store's notes."""
        where = f"rank {self.rank} of {self.world_size}: {what} (step {self.step}) failed ({_first_line(err)})"
        try:
            self.notes.set(f"failed/{self.rank}", "saw the failure")
            others = [r for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + NOTE_GRACE_S
            while True:
                silent = [r for r in others if not self.notes.check([f"failed/{r}"])]
                if not silent or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            notes = {r: self.notes.get(f"failed/{r}").decode() for r in others if r not in silent}
            stopped = [f"rank {r} {note}" for r, note in notes.items() if note.startswith("stopped")]
        except RuntimeError:  # the store is gone with the process that hosted it
            return DistributedError(f"{where}: rank 0 (or the launcher), which hosts the rendezvous store, stopped")
        named = stopped + ([f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped "
                            "responding (killed, crashed or hung)"] if silent else [])
        return DistributedError(f"{where}: {'; '.join(named) or 'another rank stopped'}")

    # -- gradients ------------------------------------------------------------------------------------------------

    def buckets(self, weights: dict[str, np.ndarray], n_layers: int, overlap: bool = True) -> GradientBuckets:
        return GradientBuckets(self, weights, n_layers, overlap)


def rank_rows(batch: int, rank: int, world_size: int) -> range:
    """The rows of a global batch of ``batch`` sequences that ``rank`` trains on: a contiguous 1/world_size of it."""
    if batch % world_size:
        raise SettingsError(f"--batch {batch} does not split over {world_size} ranks: --batch is the global batch, "
                            f"give a multiple of {world_size}")
    share = batch // world_size
    return range(rank * share, (rank + 1) * share)


def _layer_of(name: str) -> int | None:
    match = re.match(r"layers\.(\d+)\.", name)
    return int(match[1]) if match else None


class GradientBuckets:
    """The gradients of ``weights`` (same names, sorted) as views into flat float32 buffers: one bucket per
    block (its arrays become final together, when the engine's worker has added the step's last sequence's
    gradients of that block) and one for the rest (embedding, final norm, classifier), so each all-reduce is one
    gloo call on contiguous memory, with no copies. With ``overlap``, ``layer_done`` starts a block's all-reduce at
    once; without, ``finish`` starts them all (the measurement of whether overlapping pays)."""

    def __init__(self, group: ProcessGroup, weights: dict[str, np.ndarray], n_layers: int, overlap: bool):
        self.group, self.overlap = group, overlap
        # Every rank must lay its buckets out alike, and the order of a checkpoint's arrays varies per process
        # (safetensors' header is a hash map): so by name, here and in ``grads`` (the gradient norm's sum order).
        names = sorted(weights)
        members: dict[int | None, list[str]] = {}
        for name in names:
            members.setdefault(_layer_of(name), []).append(name)
        self.buffers: dict[int | None, np.ndarray] = {}
        views = {}
        for key, group_names in members.items():
            buffer = np.zeros(sum(weights[n].size for n in group_names), np.float32)
            offset = 0
            for name in group_names:
                size = weights[name].size
                views[name] = buffer[offset:offset + size].reshape(weights[name].shape)
                offset += size
            self.buffers[key] = buffer
        self.grads = {name: views[name] for name in names}
        # the order every rank starts them in: the blocks as the backward pass finishes them, then the rest
        self.order = [i for i in reversed(range(n_layers)) if i in self.buffers] + [None] * (None in self.buffers)
        self._work: dict[int | None, object] = {}
        self.wait_s = 0.0

    def zero(self) -> None:
        for buffer in self.buffers.values():
            buffer.fill(0.0)
        self._work.clear()

    def layer_done(self, layer: int) -> None:
        """Called on the engine's worker thread once block ``layer``'s gradients of the step are complete."""
        if self.overlap and layer in self.buffers:
            self._start(layer)

    def _start(self, key: int | None) -> None:
        with self.group._collective(f"all-reducing the gradients of {_bucket_name(key)}"):
            tensor = self.group.torch.from_numpy(self.buffers[key])
            self._work[key] = (tensor, self.group.dist.all_reduce(tensor, async_op=True))

    def finish(self) -> dict[str, np.ndarray]:
        """Start the buckets not started yet, wait for all; the gradients are then the sums over the ranks.
        ``wait_s`` is the time spent waiting here (the all-reduce's share of the step that did not overlap)."""
        t0 = time.perf_counter()
        for key in self.order:
            if key not in self._work:
                self._start(key)
        for key in self.order:
            with self.group._collective(f"all-reducing the gradients of {_bucket_name(key)}"):
                self._work[key][1].wait()
        self.wait_s = time.perf_counter() - t0
        return self.grads


def _bucket_name(key: int | None) -> str:
    return "the embedding, final norm and classifier" if key is None else f"block {key}"

