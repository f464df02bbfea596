"""LoRA adapters as data: what they adapt, their A and B, their scale, and PEFT's file format.

An adapted projection computes ``y = W x + s B (A x)`` with ``A [r, in]``, ``B [out, r]`` and ``s = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA). Programs take A and B as INPUTS (reference section 7), so swapping adapters is a
surface write, never a compile. A program is built for a :class:`LoraLayout` (which projections take an adapter,
and one rank every slot is padded to); any adapter that fits the layout runs in it unchanged: its A gets zero rows
and its B zero columns up to the slot's rank (exact: the extra products are zeros), and ``s`` is folded into B.

This module is pure (arrays and dicts in, arrays and bytes out): the models read and write the files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from orion.errors import OrionError


class AdapterError(OrionError):
    """An adapter that cannot run: a format Orion does not read, a module it cannot adapt, shapes that disagree."""


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True, eq=False)
class AdapterSpec:
    """How one model names and shapes the projections an adapter may target, in Hugging Face module paths."""

    family: str  # "gpt2", "llama"
    layer_prefix: str  # "transformer.h", "model.layers"
    modules: dict[str, str]  # short target name -> module path inside a layer ("q" -> "self_attn.q_proj")
    features: dict[str, tuple[int, int]]  # target -> (in_features, out_features)
    n_layers: int
    default_targets: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "ffn" -> ("gate", "up", "down")
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores W as [in, out]; A and B keep PEFT's layout regardless

    def module_key(self, layer: int, target: str) -> str:
        return f"{self.layer_prefix}.{layer}.{self.modules[target]}"

    def check_module(self, layer: int, target: str, a: np.ndarray, b: np.ndarray, where: str) -> None:
        """Refuse a module this model cannot run: a layer past its depth, an unknown target, or A and B shapes of
        another model size."""
        if target not in self.modules:
            raise AdapterError(f"{where}: {target!r} is not a projection Orion adapts in {self.family}; "
                               f"{self._choices()}")
        if not 0 <= layer < self.n_layers:
            raise AdapterError(f"{where}: {target} is for layer {layer}; the model has {self.n_layers} layers")
        fan_in, fan_out = self.features[target]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: {self.module_key(layer, target)}: lora_A {list(a.shape)} and lora_B "
                               f"{list(b.shape)} do not make a LoRA of a {fan_in} -> {fan_out} projection (A [r, "
                               f"{fan_in}], B [{fan_out}, r]); is the adapter for another model size?")

    def check(self, adapter: "Adapter", where: str) -> None:
        """Refuse an adapter of another family, with no modules, or with a module :meth:`check_module` refuses."""
        if adapter.family != self.family:
            raise AdapterError(f"{where} is for {adapter.family}, not {self.family}")
        if not adapter.modules:
            raise AdapterError(f"{where} has no modules")
        for (layer, target), m in sorted(adapter.modules.items()):
            self.check_module(layer, target, m.a, m.b, where)

    def parse_targets(self, text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """``"q,v"`` (or a list) -> targets in declaration order; aliases expand, ``all`` is every target."""
        names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
        if not names:
            raise AdapterError(f"no LoRA targets given; {self._choices()}")
        chosen: set[str] = set()
        for name in names:
            if name == "all":
                chosen |= set(self.modules)
            elif name in self.aliases:
                chosen |= set(self.aliases[name])
            elif name in self.modules:
                chosen.add(name)
            else:
                raise AdapterError(f"unknown LoRA target {name!r} for {self.family}; {self._choices()}")
        return tuple(t for t in self.modules if t in chosen)

    def _choices(self) -> str:
        extra = [*self.aliases, "all"]
        return f"choose from {', '.join(self.modules)} (or {', '.join(extra)})"


@dataclass
class LoraModule:
    """One adapted projection: ``a [r, in]``, ``b [out, r]`` (float32) and the scale ``s``."""

    a: np.ndarray
    b: np.ndarray
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        """``s B A``, the change to the base weight ``[out, in]`` (for references and merging)."""
        return self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))

    def padded(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``A`` with zero rows and ``s B`` with zero columns up to ``rank``: the program inputs of one slot."""
        if self.rank > rank:
            raise AdapterError(f"an adapter of rank {self.rank} does not fit a slot of rank {rank}")
        a = np.zeros((rank, self.a.shape[1]), np.float32)
        b = np.zeros((self.b.shape[0], rank), np.float32)
        a[:self.rank] = self.a
        b[:, :self.rank] = self.scale * self.b
        return a, b


@dataclass
class Adapter:
    """A LoRA adapter for one model: its modules by ``(layer, target)`` and where it came from."""

    family: str
    modules: dict[tuple[int, str], LoraModule]
    base_model: str | None = None
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({t for _, t in self.modules}))

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @classmethod
    def from_arrays(cls, spec: AdapterSpec, arrays: dict[str, np.ndarray], alpha: float) -> "Adapter":
        """The inverse of :meth:`to_arrays` (the modules share the arrays' memory), checked against ``spec``."""
        pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        for name, array in arrays.items():
            m = re.fullmatch(r"layers\.(\d+)\.(\w+)\.lora_([AB])", name)
            if not m:
                raise AdapterError(f"{name!r} is not an adapter array (layers.N.TARGET.lora_A or lora_B)")
            pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = array
        modules = {}
        for key, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"adapter arrays of layer {key[0]} {key[1]} lack lora_{'B' if 'A' in pair else 'A'}")
            modules[key] = LoraModule(pair["A"], pair["B"], float(alpha), scale_of(alpha, pair["A"].shape[0], False))
        adapter = cls(spec.family, modules)
        spec.check(adapter, "adapter arrays")
        return adapter

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name (``layers.{i}.{target}.lora_A`` / ``.lora_B``), sharing memory with the modules."""
        out = {}
        for (layer, target), m in sorted(self.modules.items()):
            out[f"layers.{layer}.{target}.lora_A"] = m.a
            out[f"layers.{layer}.{target}.lora_B"] = m.b
        return out


@dataclass(frozen=True)
class LoraLayout:
    """The adapter slots programs are built with: projections that take A and B as inputs, and one rank for all."""

    targets: tuple[str, ...]
    rank: int

    def fits(self, adapter: Adapter) -> bool:
        return set(adapter.targets) <= set(self.targets) and adapter.rank <= self.rank

    def slot(self, adapter: Adapter | None, layer: int, target: str, spec: AdapterSpec) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
        """One slot's ``A [R, in]`` and scaled ``B [out, R]``: the adapter's module padded, or zeros where the
        adapter (or None: the base model) leaves the projection alone."""
        module = adapter.modules.get((layer, target)) if adapter is not None else None
        if module is not None:
            return module.padded(self.rank)
        fan_in, fan_out = spec.features[target]
        return np.zeros((self.rank, fan_in), np.float32), np.zeros((fan_out, self.rank), np.float32)

    @classmethod
    def covering(cls, adapters, multiple: int = 1) -> "LoraLayout":
        """The smallest layout every adapter fits, its rank rounded up to ``multiple`` (the target's matmul
        inner-dimension multiple: B's product sums over the rank)."""
        adapters = list(adapters)
        targets = tuple(sorted({t for a in adapters for t in a.targets}))
        rank = max((a.rank for a in adapters), default=1)
        return cls(targets, -(-rank // multiple) * multiple)


def scale_of(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def new_adapter(spec: AdapterSpec, targets, rank: int, alpha: float, seed: int = 0) -> Adapter:
    """A fresh adapter as PEFT initializes one: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform with
    ``a = sqrt(5)``), ``B = 0``, so the adapted model starts equal to its base."""
    if rank < 1:
        raise AdapterError(f"LoRA rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise AdapterError(f"LoRA alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(spec.n_layers):
        for target in spec.parse_targets(targets):
            fan_in, fan_out = spec.features[target]
            bound = 1.0 / math.sqrt(fan_in)
            modules[(layer, target)] = LoraModule(rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32),
                                                  np.zeros((fan_out, rank), np.float32), float(alpha),
                                                  scale_of(alpha, rank, False))
    return Adapter(spec.family, modules)


# ---------------------------------------------------------------------------------------------------------------------
# PEFT format: adapter_config.json + adapter_model.safetensors

_PEFT_PREFIX = "base_model.model."
#: PEFT LoraConfig keys of variants whose forward is not ``W x + s B A x`` (aLoRA keeps LoRA's tensors, so only its
#: config tells it apart: it acts only after its invocation tokens).
_VARIANTS = {
    "alora_invocation_tokens": "an aLoRA adapter acts only after its invocation tokens",
    "lora_bias": "the adapter adds a trained bias to lora_B",
    "use_bdlora": "a BD-LoRA adapter has block-diagonal factors",
    "kasa_config": "a KaSA adapter has singular values between A and B and changes the base weight",
    "monteclora_config": "a MonteCLoRA adapter samples its weights",
    "arrow_config": "an Arrow adapter routes between several LoRA modules",
    "layer_replication": "the adapter's base model repeats layers",
}
_TENSOR = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern that matches the end of the module key."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def parse_peft(config: dict, tensors: dict[str, np.ndarray], spec: AdapterSpec, where: str = "adapter") -> Adapter:
    """A PEFT LoRA adapter (its config and tensors) for a model of ``spec``; every fault names the file and fix."""
    def fail(message: str) -> AdapterError:
        return AdapterError(f"{where}: {message}")

    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise fail(f"peft_type {config.get('peft_type')!r} is not LORA; Orion runs LoRA adapters only")
    for key, bad, why in (("use_dora", True, "DoRA adapters need a weight norm Orion does not compute"),
                          ("bias", ("all", "lora_only"), "adapters that train biases are not supported")):
        if config.get(key) in (bad if isinstance(bad, tuple) else (bad,)):
            raise fail(f"{key}={config.get(key)!r}: {why}; export the adapter with {key} off")
    for key, what in _VARIANTS.items():
        if config.get(key):
            raise fail(f"{key}={config[key]!r}: {what}, not plain LoRA; Orion runs plain LoRA adapters only")
    if config.get("modules_to_save"):
        raise fail(f"modules_to_save={config['modules_to_save']!r}: the adapter replaces whole modules; Orion runs "
                   "adapters of projections only (merge those modules into the base model)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise fail(f"{key} must be a positive number, got {config.get(key)!r}")
    rslora = bool(config.get("use_rslora", False))
    by_path = {path: target for target, path in spec.modules.items()}
    # the layers' path in the model peft wrapped: the LM head model's ("model.layers") or the bare model's ("layers")
    bare = spec.layer_prefix.rsplit(".", 1)[-1]
    layer_re = re.compile(rf"(?:{re.escape(spec.layer_prefix)}|{re.escape(bare)})\.(\d+)\.(.+)")
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        short = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        m = _TENSOR.fullmatch(short)
        layer = m and layer_re.fullmatch(m["module"])
        if not (m and layer and layer[2] in by_path):
            raise fail(f"tensor {name!r} is not a LoRA weight of a projection Orion adapts in {spec.family} "
                       f"({', '.join(f'{spec.layer_prefix}.N.{p}' for p in spec.modules.values())})")
        pair = found.setdefault((int(layer[1]), by_path[layer[2]]), {})
        if m["which"] in pair:
            raise fail(f"two lora_{m['which']} tensors for {m['module']}")
        pair[m["which"]] = np.asarray(array, np.float32)
    if not found:
        raise fail("holds no LoRA tensors")
    modules = {}
    for (layer, target), pair in sorted(found.items()):
        key = spec.module_key(layer, target)
        if set(pair) != {"A", "B"}:
            raise fail(f"{key} has lora_{''.join(pair)} but not lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        spec.check_module(layer, target, a, b, where)
        rank = a.shape[0]
        declared = _pattern_value(config.get("rank_pattern"), key, config["r"])
        if rank != declared:
            raise fail(f"{key}: lora_A has {rank} rows but the config says r={declared}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise fail(f"{key}: the adapter holds NaN or infinite values")
        alpha = float(_pattern_value(config.get("alpha_pattern"), key, config["lora_alpha"]))
        modules[(layer, target)] = LoraModule(a, b, alpha, scale_of(alpha, rank, rslora))
    return Adapter(spec.family, modules, config.get("base_model_name_or_path"), rslora)


def peft_files(adapter: Adapter, spec: AdapterSpec, base_model: str | None = None) -> dict[str, bytes]:
    """The two files of a PEFT LoRA adapter (float32 tensors), ready to write; peft's ``PeftModel.from_pretrained``
    loads them. Modules whose rank or alpha differs from the most common one go in rank/alpha patterns."""
    from safetensors.numpy import save

    if not adapter.modules:
        raise AdapterError("the adapter has no modules to save")

    def common(values):
        values = list(values)
        return max(set(values), key=values.count)

    rank = common(m.rank for m in adapter.modules.values())
    alpha = common(m.alpha for m in adapter.modules.values())
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for (layer, target), m in sorted(adapter.modules.items()):
        key = spec.module_key(layer, target)
        tensors[f"{_PEFT_PREFIX}{key}.lora_A.weight"] = np.ascontiguousarray(m.a, np.float32)
        tensors[f"{_PEFT_PREFIX}{key}.lora_B.weight"] = np.ascontiguousarray(m.b, np.float32)
        if m.rank != rank:
            rank_pattern[re.escape(key)] = m.rank
        if m.alpha != alpha:
            alpha_pattern[re.escape(key)] = m.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted({spec.modules[t] for t in adapter.targets}), "bias": "none",
        "fan_in_fan_out": spec.fan_in_fan_out, "use_rslora": adapter.rslora, "use_dora": False, "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": True,
        "base_model_name_or_path": base_model if base_model is not None else adapter.base_model,
    }
    return {CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode(),
            WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}
