"""The training loop: data -> engine (backend + CPU) -> guarded AdamW step -> new weights as input writes ->
metrics, loss curve, checkpoints. A run of N steps resumed after step k ends with bitwise the weights of an
uninterrupted run: every source of state (weights, moments, loss scale, data position, RNG) and every setting is
checkpointed, a setting left unset on resume is the checkpoint's, and the computation is deterministic.

``base`` starts from a trained model instead of fresh weights; with ``lora_rank`` only a LoRA adapter is trained on
that frozen base: the programs take the adapter as inputs, checkpoints hold the adapter and its moments (and PEFT's
two files, so a checkpoint folder is also an adapter peft loads), and the base is checked by digest on resume.

With ``group`` (a :class:`orion.train.distributed.ProcessGroup`), this process is one rank of a data-parallel run:
it trains on its rows of each global batch, the gradients are all-reduced before the step, and rank 0 alone writes
checkpoints and metrics (see ``distributed.py``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from orion import __version__
from orion.compiler.targets import get_target
from orion.errors import OrionError, SettingsError
from orion.fileio import atomic_write, write_atomic
from orion.lora import Adapter, LoraLayout, new_adapter, peft_files
from orion.models.llama import PRESETS, LlamaConfig, adapter_spec, init_weights
from orion.train.checkpoint import (checkpoint_step, find_latest_checkpoint, latest_checkpoint, load_checkpoint,
                                   save_checkpoint)
from orion.models.hub import Tokenizer
from orion.runtime.program import backends_that_ran
from orion.train.data import BatchStream, PreparedDataset, prepare_dataset, tokenizer_files
from orion.train.engine import LlamaEngine
from orion.train.optim import AdamW, LossScaler, cosine_lr, guarded_step


#: The model preset of a fresh run that names none.
DEFAULT_PRESET = "tiny"

#: What a fresh run uses for each setting left at None (unset); a resumed run takes the checkpoint's instead.
FRESH_DEFAULTS = {"preset": DEFAULT_PRESET, "batch": 8, "accum": 1, "lr": 3e-4, "min_lr_fraction": 0.1,
                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "adam_eps": 1e-8, "grad_clip": 1.0,
                  "loss_scale": "dynamic", "init_scale": 256.0, "seed": 0, "save_every": 100, "keep_last": 3,
                  "lora_alpha": 16.0}

#: Settings older checkpoints do not record, with the value every run used before they were recorded.
UNRECORDED_BEFORE = {"adam_eps": 1e-8}  # AdamW's default eps, which the trainer always used until it was a setting

#: The settings an exact resume depends on, each with what the checkpoint restores that fixes it. Given on resume,
#: each must agree with the checkpoint; so must the model's shape, the tokenizer and the base of an adapter. The
#: rest may change: the learning-rate schedule (``steps``, ``lr``, ``warmup``, ``min_lr_fraction``) is no state, as
#: every step's rate is computed from them, ``save_every`` and ``keep_last`` only say what is written, and ``data``
#: may be given where it is now (the restored batch stream checks its token count).
FIXED_ON_RESUME = {
    "batch": "its batch stream draws batches of that size, and the loss is averaged over them",
    "accum": "each step draws that many batches from its batch stream",
    "seed": "its batch stream shuffles with that seed",
    "loss_scale": "its loss scaler keeps its mode",
    "init_scale": "its loss scaler started from that scale and goes on from the one it reached",
    "beta1": "its AdamW moments are running averages at that rate",
    "beta2": "its AdamW moments are running averages at that rate",
    "adam_eps": "every AdamW update divides by sqrt(v) + eps",
    "weight_decay": "every AdamW update decays the weights by lr times it",
    "grad_clip": "every step clips the gradients to that norm",
    "lora_rank": "its adapter has that rank",
    "lora_alpha": "its adapter adds alpha / rank times B A",
    "lora_targets": "its adapter adapts those projections",
}

#: The settings ``orion train`` has a flag for (``--lora-rank`` for ``lora_rank``); errors name the flag.
_FLAGS = {"batch", "accum", "seed", "loss_scale", "lora_rank", "lora_alpha", "lora_targets"}


@dataclass
class TrainSettings:
    """What a run trains and how. A setting left at None (unset) is the checkpoint's on resume, as nanoGPT's resume
    takes its model arguments from it, and ``FRESH_DEFAULTS`` (or the preset's, the base model's) on a fresh run. On
    resume, the model's shape and tokenizer, an adapter's base and the settings in ``FIXED_ON_RESUME`` must be unset
    or agree with the checkpoint; ``data``, ``steps``, ``lr``, ``warmup``, ``min_lr_fraction``, ``save_every`` and
    ``keep_last`` may change."""

    preset: str | None = None
    data: str | None = None  # on resume, the checkpoint's; its token file must hold as many tokens as the run's
    out: str = "out/train"
    steps: int = 200
    batch: int | None = None
    accum: int | None = None
    lr: float | None = None  # on resume, a new peak of the same cosine schedule from the resumed step on
    min_lr_fraction: float | None = None  # the schedule ends at lr times this
    warmup: int | None = None  # fresh: a tenth of the steps (1 to 100)
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    adam_eps: float | None = None
    grad_clip: float | None = None
    loss_scale: str | None = None
    init_scale: float | None = None  # the loss scale a fresh run starts from; a resumed run restores its scaler's
    seed: int | None = None
    save_every: int | None = None
    keep_last: int | None = None
    seq_len: int | None = None  # fresh: the preset's (or the base model's)
    tokenizer: str | None = None  # fresh: the base model's, else a BPE of the data
    model_overrides: dict = dataclasses.field(default_factory=dict)
    base: str | None = None  # a trained Llama (HF folder, hub id or Orion checkpoint) to start from
    lora_rank: int | None = None  # train only a LoRA adapter of this rank on the frozen base
    lora_alpha: float | None = None
    lora_targets: str | None = None  # None: the model's default (Llama: q,v)

    def validate(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise SettingsError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        for name in ("steps", "batch", "accum", "save_every", "keep_last"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise SettingsError(f"--lr must be positive, got {self.lr}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise SettingsError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise SettingsError(f"--lora-alpha must be positive, got {self.lora_alpha}")

    def with_defaults(self) -> TrainSettings:
        """These settings with each one left unset at what a fresh run uses (``FRESH_DEFAULTS``)."""
        return _filled(self, FRESH_DEFAULTS)

    def model_config(self, vocab_size: int, base: LlamaConfig | None = None) -> LlamaConfig:
        """The preset's shape (or the base model's), with the tokenizer's vocabulary and ``seq_len``."""
        if base is not None and base.vocab_size != vocab_size:
            raise SettingsError(f"the base model has a vocabulary of {base.vocab_size} but the tokenizer has "
                                f"{vocab_size}: give --tokenizer, the one the base was trained with")
        fields = {name: value for name, (_, value) in self.shape(self.preset or DEFAULT_PRESET, base).items()}
        return LlamaConfig(**(fields | {"vocab_size": vocab_size}))

    def shape(self, preset: str | None, base: LlamaConfig | None) -> dict[str, tuple[str, object]]:
        """Each model field these settings fix, with the setting that fixes it ("base", "preset",
        "model_overrides", "seq_len"): the base model's shape, else the preset's (if any) with model_overrides over
        it; ``seq_len`` over either."""
        if base is not None:
            fields = {name: ("base", value) for name, value in base.to_dict().items()}
        else:
            fields = {name: ("preset", value) for name, value in PRESETS[preset].to_dict().items()
                      } if preset else {}
            fields |= {name: ("model_overrides", value) for name, value in self.model_overrides.items()}
        if self.seq_len:
            fields["max_seq_len"] = ("seq_len", self.seq_len)
        return fields


def _load_tokenizer(spec: str) -> Tokenizer:
    """``--tokenizer``: a tokenizer.json, or a folder with one (or with a SentencePiece tokenizer.model)."""
    return Tokenizer.from_dir(Path(spec).parent if spec.endswith(".json") else spec)


def _read_base(spec: str) -> tuple[Path, LlamaConfig, dict[str, np.ndarray]]:
    """The folder, config and weights of the base model ``spec`` (a Llama folder, hub id or Orion checkpoint)."""
    from orion.models import read_llama
    from orion.models.hub import resolve_model

    folder = resolve_model(spec)
    return folder, *read_llama(folder)


def _fresh_tokenizer(settings: TrainSettings, base_folder: Path | None) -> Tokenizer | None:
    """The tokenizer a fresh run is given: ``--tokenizer``, else the base model's, else None (a BPE of the data)."""
    if settings.tokenizer:
        return _load_tokenizer(settings.tokenizer)
    if base_folder is not None and (base_folder / "tokenizer.json").is_file():
        return Tokenizer.from_dir(base_folder)
    return None


def _filled(settings: TrainSettings, values: dict) -> TrainSettings:
    """``settings`` with each setting left at None taken from ``values``."""
    return dataclasses.replace(settings, **{name: value for name, value in values.items()
                                            if getattr(settings, name) is None})


def _held_settings(state: dict) -> dict:
    """The settings of the run a checkpoint's ``state`` saved, those it does not record at the value they had then
    (``UNRECORDED_BEFORE``). Those in ``FIXED_ON_RESUME`` are read from what restores them where it records them
    (the batch stream, the loss scaler, the adapter), so the values compared are the ones the resumed run will
    use."""
    saved = UNRECORDED_BEFORE | state.get("settings", {})
    held = {name: saved[name] for name in FRESH_DEFAULTS if saved.get(name) is not None}
    held |= {"preset": saved.get("preset") or DEFAULT_PRESET, "batch": state["data"]["batch_size"],
             "seed": state["data"]["seed"], "loss_scale": state["loss_scaler"]["mode"], "warmup": saved.get("warmup"),
             "seq_len": state["config"]["max_seq_len"], "tokenizer": saved.get("tokenizer"), "base": saved.get("base"),
             "data": saved.get("data")}
    if lora := state.get("lora"):
        held |= {"lora_rank": lora["rank"], "lora_alpha": lora["alpha"], "lora_targets": ",".join(lora["targets"]),
                 "base": state["base"]["path"]}
    return held


def _refusal(name: str, given, checkpoint: Path, held: str, why: str) -> SettingsError:
    """The one-line error for setting ``name`` given on resume as ``given`` against the checkpoint's run (``held``
    says what it was, ``why`` what fixes it): named by its flag where ``orion train`` has one."""
    if name in _FLAGS:
        flag = "--" + name.replace("_", "-")
        return SettingsError(f"{flag} is {given}, but {checkpoint} {held}; on --resume {name} comes from the "
                             f"checkpoint ({why}): leave {flag} out, or use another --out")
    return SettingsError(f"{name} is {given}, but {checkpoint} {held}; on resume {name} comes from the checkpoint "
                         f"({why}): leave {name} unset, or train into another out folder")


def _resumed_settings(settings: TrainSettings, state: dict, base: LlamaConfig | None, tokenizer: Tokenizer,
                      checkpoint: Path) -> TrainSettings:
    """``settings`` with each one left unset taken from the checkpoint a run resumes, after refusing any setting
    given that contradicts the model the checkpoint holds or a setting the exact resume depends on (naming it and
    both values). ``base`` is the config of a base model given on resume."""
    held = LlamaConfig(**state["config"]).to_dict()  # with the defaults of fields older checkpoints lack
    flags = {"base": f"--base {settings.base}", "preset": f"--config {settings.preset}",
             "model_overrides": "model_overrides", "seq_len": f"--seq-len {settings.seq_len}"}
    for name, (source, value) in settings.shape(settings.preset, base).items():
        # A preset's vocabulary is only the size of the BPE a fresh run trains, and the context length of a preset
        # or base model is a default that --seq-len overrides, so only --seq-len pins max_seq_len.
        if (name == "max_seq_len" and source != "seq_len") or (name == "vocab_size" and source == "preset"):
            continue
        if held.get(name) != value:
            flag = flags[source]
            raise SettingsError(f"{flag} sets {name} {value}, but {checkpoint} holds a model with {name} "
                                f"{held.get(name)}; on --resume the model's shape comes from the checkpoint: leave "
                                f"{flag.split()[0]} out, or use another --out")
    given = _load_tokenizer(settings.tokenizer) if settings.tokenizer else None
    if given is not None and tokenizer_files(given) != tokenizer_files(tokenizer):
        raise SettingsError(f"--tokenizer {settings.tokenizer} ({given.vocab_size} tokens) is not the tokenizer "
                            f"{checkpoint} was trained with (saved in it, {tokenizer.vocab_size} tokens); on "
                            "--resume the tokenizer comes from the checkpoint: leave --tokenizer out, or use another "
                            "--out")
    run = _held_settings(state)
    for name, why in FIXED_ON_RESUME.items():
        given = getattr(settings, name)
        if given is None:
            continue
        if name.startswith("lora_") and "lora" not in state:
            raise _refusal(name, given, checkpoint, "trained a whole model, not a LoRA adapter", "it has none")
        same = given
        if name == "lora_targets":  # the same projections, however spelled ("v,q", "attn")
            same = ",".join(adapter_spec(LlamaConfig(**state["config"])).parse_targets(given))
        if name in run and same != run[name]:
            raise _refusal(name, given, checkpoint, f"was trained with {name} {run[name]}", why)
    resumed = _filled(settings, run)
    unknown = [name for name in FRESH_DEFAULTS if getattr(resumed, name) is None]
    if unknown:
        raise SettingsError(f"{checkpoint} does not record {', '.join(unknown)}, and the run's values cannot be "
                            "known; give them as the run had them, or use another --out")
    return resumed


def _dataset(settings: TrainSettings, folder: Path, tokenizer: Tokenizer | None) -> PreparedDataset:
    """Text sources are tokenized into ``folder`` with ``tokenizer``, or a BPE of the preset's vocabulary size trained
    on them; a pre-tokenized uint16 ``.bin`` is used as it is, with the tokenizer it was made with."""
    if settings.data.endswith(".bin"):
        data = Path(settings.data)
        if not data.is_file():
            raise OrionError(f"token file {data} not found")
        if tokenizer is None:
            if not (data.parent / "tokenizer.json").is_file():
                raise OrionError(f"{data} is pre-tokenized: give --tokenizer (the tokenizer.json or folder it was "
                                 "made with)")
            tokenizer = Tokenizer.from_dir(data.parent)
        return PreparedDataset(data.parent, data, data, tokenizer, {"source": str(data)})
    return prepare_dataset(settings.data, folder, tokenizer=tokenizer,
                           vocab_size=PRESETS[settings.preset].vocab_size)


def _warmup(settings: TrainSettings) -> int:
    return settings.warmup if settings.warmup is not None else max(1, min(100, settings.steps // 10))


class Trainer:
    """``Trainer(settings, resume=True, backend=..., target=...).run()``.

    With ``resume``, the newest intact checkpoint in ``settings.out`` is found and read here, before anything is
    prepared, because it decides the model's shape, the tokenizer, an adapter's base and every setting left unset.
    ``on_notice`` receives what the user should know (a damaged checkpoint skipped, a corpus split on its token
    stream); without it, each is a RuntimeWarning."""

    def __init__(self, settings: TrainSettings, *, resume: bool = False, backend="auto", target="default",
                 cache=None, budget=None, on_step: Callable[[dict], None] | None = None,
                 on_notice: Callable[[str], None] | None = None, group=None):
        settings.validate()
        self.group = group
        self.is_writer = group is None or group.is_writer
        self.overlap = True  # a data-parallel run all-reduces each block's gradients while the next runs backward
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.on_notice = on_notice
        self.checkpoint = self._find_checkpoint() if resume else None
        if group is not None:
            group.same(checkpoint_step(self.checkpoint) if self.checkpoint else -1,
                       "the step of the checkpoint to resume (-1: none; --out must be a folder every rank sees)")
        restored = None if self.checkpoint is None else load_checkpoint(self.checkpoint)  # (weights, moments, state)
        if restored is None and not settings.data:
            raise SettingsError("give --data: a .txt/.jsonl file or folder, a tokenized .bin, or a hub dataset id")
        if restored is None and settings.lora_rank is not None and settings.base is None:
            raise SettingsError("LoRA training needs a base model to adapt: give --base (a Llama folder, hub id or "
                                "Orion checkpoint)")
        # The base model: the one given, else the frozen base of the adapter the checkpoint holds (its path and
        # sha256; a whole-model run's base was only its starting point, which its checkpoint has moved on from).
        held_base = restored[2]["base"] if restored is not None and "lora" in restored[2] else None
        self.base_weights, base_config, base_folder = None, None, None
        if settings.base is not None:
            base_folder, base_config, self.base_weights = _read_base(settings.base)
        elif held_base is not None:
            try:
                base_folder, _, self.base_weights = _read_base(held_base["path"])
            except OrionError as err:
                raise OrionError(f"{self.checkpoint} adapts the base model {held_base['path']}, which cannot be read "
                                 f"now ({err}); give --base: that model (its sha256 is checked)") from err
        if self.base_weights is not None and (settings.lora_rank is not None or held_base is not None):
            self.base_digest = weights_digest(self.base_weights)  # a frozen base: resume checks it is the same
        if held_base is not None:
            self._check_base(held_base, settings.base)
        if restored is None:
            self.settings = settings.with_defaults()
            self.dataset = self._prepare(_fresh_tokenizer(settings, base_folder))
            self.config = self.settings.model_config(self.dataset.tokenizer.vocab_size, base_config)
        else:
            tokenizer = Tokenizer.from_dir(self.checkpoint)
            self.settings = _resumed_settings(settings, restored[2], base_config, tokenizer, self.checkpoint)
            self.dataset = self._prepare(tokenizer)
            self.config = LlamaConfig(**restored[2]["config"])
        if group is not None:
            group.rows(self.settings.batch)  # refuses a batch that does not split over the ranks
        if self.dataset.split_note:
            self._notice(self.dataset.split_note)
        self.spec = adapter_spec(self.config)
        self.lora_targets = None
        if self.trains_adapter:
            self.lora_targets = self.spec.parse_targets(self.settings.lora_targets or self.spec.default_targets)
        self.backend, self.cache, self.budget = backend, cache, budget
        self.target = get_target(target)
        self.on_step = on_step
        self.metrics_path = self.out / "metrics.jsonl"
        # Everything that can refuse the run (a checkpoint of other LoRA settings, too little data) happens here,
        # so run() only trains: (step, weights, optimizer, loss scaler, batch stream) to start from.
        self._start = self._fresh() if restored is None else self._resumed(*restored)
        self.start_step = self._start[0]

    def _prepare(self, tokenizer: Tokenizer | None) -> PreparedDataset:
        """The dataset; in a data-parallel run rank 0 prepares it and the others then reuse its files."""
        if self.group is None:
            return _dataset(self.settings, self.out / "data", tokenizer)
        with self.group.rank0_first("preparing the data"):
            return _dataset(self.settings, self.out / "data", tokenizer)

    def _notice(self, message: str) -> None:
        if not self.is_writer:  # in a data-parallel run every rank finds the same: rank 0 says it
            return
        if self.on_notice is None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            self.on_notice(message)

    def _find_checkpoint(self) -> Path | None:
        """The newest intact checkpoint, after a notice naming each damaged one skipped and what it resumes from."""
        found, damaged = find_latest_checkpoint(self.out)
        if damaged:
            then = f"resuming from {found}" if found else "no intact checkpoint is left, so training starts at step 0"
            self._notice(f"{'; '.join(damaged)}; skipped {'it' if len(damaged) == 1 else 'them'}, {then}")
        return found

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def trains_adapter(self) -> bool:
        return self.settings.lora_rank is not None

    def _lora_state(self) -> dict:
        s = self.settings
        return {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": list(self.lora_targets)}

    def _fresh(self):
        s = self.settings
        if self.trains_adapter:
            weights = new_adapter(self.spec, self.lora_targets, s.lora_rank, s.lora_alpha, s.seed).to_arrays()
        elif self.base_weights is not None:
            weights = {k: v.copy() for k, v in self.base_weights.items()}
        else:
            weights = init_weights(self.config, s.seed)
        optimizer = self._optimizer(weights)
        scaler = LossScaler(s.loss_scale, init_scale=s.init_scale)
        stream = BatchStream(self.dataset.train, s.batch, self.config.max_seq_len, seed=s.seed)
        return 0, weights, optimizer, scaler, stream

    def _check_base(self, held: dict, given: str | None) -> None:
        """Refuse a base model other than the one the checkpoint's adapter was trained on (``held``: its path and
        sha256), naming the ``given`` one or, if it came from the checkpoint, saying that model changed."""
        if held["sha256"] == self.base_digest:
            return
        if given is not None:
            raise SettingsError(f"--base {given} is not the base model {self.checkpoint} was trained on "
                                f"({held['path']}, sha256 {held['sha256'][:12]}...); on --resume the base comes from "
                                "the checkpoint: leave --base out, or use another --out")
        raise OrionError(f"the base model {held['path']} changed since {self.checkpoint} was trained on it (sha256 "
                         f"{self.base_digest[:12]}..., the checkpoint records {held['sha256'][:12]}...); give --base: "
                         "the model it was trained on, or use another --out")

    def _resumed(self, weights: dict[str, np.ndarray], moments: dict[str, np.ndarray], state: dict):
        s = self.settings
        optimizer = self._optimizer(weights)
        optimizer.load_state_dict(moments)
        scaler = LossScaler(s.loss_scale, init_scale=s.init_scale)
        scaler.load_state_dict(state["loss_scaler"])
        stream = BatchStream.restore(state["data"], self.dataset.train)
        return int(state["step"]), weights, optimizer, scaler, stream

    def _optimizer(self, weights: dict[str, np.ndarray]) -> AdamW:
        s = self.settings
        return AdamW(weights, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps, weight_decay=s.weight_decay)

    def _save(self, step, weights, optimizer, scaler, data_state, timings) -> Path:
        state = {"config": self.config.to_dict(), "settings": dataclasses.asdict(self.settings), "step": step,
                 "ranks": 1 if self.group is None else self.group.world_size,
                 "data": data_state, "loss_scaler": scaler.state_dict(), "timings": timings,
                 "orion_version": __version__, "tokenizer": str(self.dataset.directory)}
        extra = tokenizer_files(self.dataset.tokenizer)
        if self.trains_adapter:
            base = str(Path(self.settings.base).resolve()) if Path(self.settings.base).exists() else self.settings.base
            state |= {"lora": self._lora_state(), "base": {"path": base, "sha256": self.base_digest}}
            extra |= peft_files(self._adapter(weights), self.spec, base)
        return save_checkpoint(self.out, step, weights, optimizer.state_dict(), state,
                               keep_last=self.settings.keep_last, extra_files=extra)

    def _adapter(self, arrays: dict[str, np.ndarray]) -> Adapter:
        return Adapter.from_arrays(self.spec, arrays, self.settings.lora_alpha)

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train up to ``settings.steps`` (from the checkpoint found when resuming); call it once. BLAS runs one
        thread per caller: the engine already overlaps the backend with a CPU worker, and two BLAS thread pools
        spinning on two cores slow both down (measured 2.3x on this machine's 2 cores)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return self._run()

    def _run(self) -> dict:
        s = self.settings
        start, weights, optimizer, scaler, stream = self._start
        if self.is_writer:
            self._trim_metrics(start)
        if start >= s.steps:
            return {"step": start, "message": f"already at step {start} of {s.steps}"}
        adapter = self._adapter(weights) if self.trains_adapter else None
        engine = LlamaEngine(self.config, self.config.max_seq_len, backend=self.backend, target=self.target,
                             cache=self.cache, budget=self.budget,
                             lora=None if adapter is None else LoraLayout.covering(
                                 [adapter], self.target.matmul_inner_multiple))
        model_weights = weights if adapter is None else self.base_weights | weights

        def push_weights() -> None:
            """The optimizer's new values into the programs' input surfaces."""
            if adapter is None:
                engine.set_weights(weights)
            else:
                engine.set_adapter(adapter)

        group = self.group
        buckets = None if group is None else group.buckets(weights, self.config.n_layers, overlap=self.overlap)
        rows = range(stream.batch_size) if group is None else group.rows(stream.batch_size)
        history = []
        done = start
        data_state = stream.state()  # the stream's position after the last finished step
        committing = False
        try:
            if adapter is not None:
                engine.set_weights(self.base_weights)
            push_weights()
            tokens_per_step = s.accum * stream.batch_size * stream.seq_len  # the tokens each step draws
            for step in range(start + 1, s.steps + 1):
                t0 = time.perf_counter()
                before = dict(engine.timings)
                lr = cosine_lr(step, max_lr=s.lr, warmup_steps=_warmup(s), total_steps=s.steps,
                               min_lr=s.lr * s.min_lr_fraction)
                if buckets is None:  # by name: a checkpoint's arrays load in an order that varies per process
                    grads = {name: np.zeros_like(weights[name]) for name in sorted(weights)}
                else:
                    group.step = step
                    buckets.zero()
                    grads = buckets.grads
                loss = 0.0
                data_state = stream.state()
                for micro in range(s.accum):
                    inputs, targets = next(stream)
                    for row in rows:
                        last = buckets is not None and micro == s.accum - 1 and row == rows[-1]
                        loss += engine.loss_and_grads(model_weights, inputs[row], targets[row], scaler.scale,
                                                      grads, tokens_per_step, buckets.layer_done if last else None)
                allreduce_s = 0.0
                if buckets is not None:  # the sums over the ranks: the gradients and loss of the global batch
                    buckets.finish()
                    loss = group.total(loss, "summing the loss")
                    allreduce_s = buckets.wait_s
                cpu0 = time.perf_counter()
                committing = True
                report = guarded_step(optimizer, scaler, grads, max_norm=s.grad_clip, lr=lr,
                                      agree=None if group is None else group.any_overflow)
                engine.timings["cpu"] += time.perf_counter() - cpu0
                if not report.skipped:
                    push_weights()
                done, committing = step, False
                data_state = stream.state()
                elapsed = time.perf_counter() - t0
                split = {k: (engine.timings[k] - before[k]) * 1e3 for k in engine.timings}
                record = {"step": step, "loss": loss / tokens_per_step, "lr": lr, "grad_norm": report.grad_norm,
                          "loss_scale": report.scale, "skipped": report.skipped, "ms": elapsed * 1e3,
                          "ms_backend": split["backend"], "ms_cpu": split["cpu"], "ms_update": split["update"],
                          "ms_allreduce": allreduce_s * 1e3,
                          "tokens_per_s": tokens_per_step / elapsed, "compiles": engine.compiles,
                          "backend": backends_that_ran(engine.programs)}
                history.append(record)
                if self.is_writer:
                    with open(self.metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                if self.is_writer and (step % s.save_every == 0 or step == s.steps):
                    self._save(step, weights, optimizer, scaler, data_state, split)
                    plot_loss_curve(self.metrics_path, self.out / "loss.png")
                if self.on_step:
                    self.on_step(record)
        except KeyboardInterrupt:
            # a run always ends with a checkpoint of its last finished step (SIGKILL aside: then the last save),
            # with the data position from before the interrupted step's batches; an interrupt while the optimizer
            # commits could leave weights half-written, so then the last periodic checkpoint stands
            if self.is_writer and done > start and not committing and (latest_checkpoint(self.out) is None
                                                                       or done % s.save_every):
                self._save(done, weights, optimizer, scaler, data_state, {})
                plot_loss_curve(self.metrics_path, self.out / "loss.png")
            raise
        finally:
            engine.close()
        return {"step": s.steps, "final_loss": history[-1]["loss"] if history else None,
                "skipped_steps": sum(r["skipped"] for r in history), "compiles": engine.compiles,
                "backend": backends_that_ran(engine.programs),
                "checkpoint": str(latest_checkpoint(self.out)) if self.is_writer else None}


    def _trim_metrics(self, start: int) -> None:
        """Keep the metrics of steps up to ``start`` (the step the run continues from), written atomically."""
        if not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start]
        write_atomic(self.metrics_path, "".join(row + "\n" for row in rows))


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes: tells a resumed adapter run that its base is the same model."""
    h = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        h.update(array.data)
    return h.hexdigest()


def plot_loss_curve(metrics: Path, png: Path) -> None:
    """Draw the loss curve from the JSONL metrics (written atomically so a reader never sees half a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Orion training loss")
    ax.grid(alpha=0.3)
    with atomic_write(png) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
