"""Language models on Orion: Hugging Face folders (or hub ids) in, weights, tokenizer and sampled text out."""

from __future__ import annotations

from typing import Mapping

from orion.compiler.targets import Target, get_target
from orion.errors import OrionError

#: On the emulator, model-sized programs default to the fp32 accumulator: the fixed-point model of the ANE's wide
#: sum (a fitted model, reference N3) costs 10-20x more per matmul and changes logits by about 1e-3.
MODEL_ACCUMULATOR = "fp32"


def model_backend(backend="auto", target: Target | str = "default", accumulator: str | None = MODEL_ACCUMULATOR):
    """The backend a model runs on; the emulator's accumulator is ``accumulator`` (None: the target's own)."""
    from orion.runtime.backends.emulator import EmulatorBackend
    from orion.runtime.backends.numerics import Numerics
    from orion.runtime.program import get_backend

    target = get_target(target)
    chosen = get_backend(backend, target)
    if isinstance(chosen, EmulatorBackend) and accumulator is not None:
        chosen.numerics = Numerics.from_dict({**chosen.numerics.to_dict(), "accumulator": accumulator})
    return chosen


def load(path_or_id: str, *, backend="auto", target: Target | str = "default", accumulator: str | None =
         MODEL_ACCUMULATOR, cache=None, budget=None, quantize=None, head: str = "cpu"):
    """A model from a Hugging Face folder (GPT-2, or the Llama family: Llama, Mistral, Qwen2, Qwen3), a hub id, or
    an Orion training checkpoint: ``orion.load("gpt2").generate("Once upon a time")``. ``quantize`` (``"int8"``,
    ``"int4/32"``, ``"lut4"`` ...) compresses the weights its programs bake, once, at compile (cached like any
    program). ``head``: where the classifier runs, ``"cpu"`` or ``"ane"``."""
    from orion.models.hub import Tokenizer, load_weights

    folder, config, state = _describe(path_or_id)
    if state is not None and "lora" in state:
        # a LoRA training checkpoint: its base model with the adapter (PEFT files in the checkpoint) active
        model = load(state["base"]["path"], backend=backend, target=target, accumulator=accumulator, cache=cache,
                     budget=budget, quantize=quantize, head=head)
        model.set_adapter(model.load_adapter(folder))
        return model
    tokenizer = Tokenizer.from_dir(folder) if _has_tokenizer(folder) else None
    options = dict(backend=model_backend(backend, target, accumulator), target=target, cache=cache, budget=budget,
                   quantize=quantize)
    if config is not None and config.get("model_type") == "gpt2":
        from orion.models.gpt2 import GPT2, GPT2Config

        # read one tensor at a time as GPT-2 folds its blocks: the whole file is never in memory at once
        return GPT2(GPT2Config.from_hf(config), load_weights(folder, lazy=True), tokenizer, head=head, **options)
    from orion.models.llama import Llama

    # read one tensor at a time as the blocks fold: the whole file is never in memory at once
    return Llama(*_llama(folder, config, state, lazy=True), tokenizer, head=head, **options)


def read_llama(path_or_id) -> tuple["LlamaConfig", dict]:
    """A Llama's config and float32 weights from a Hugging Face folder (or hub id) or an Orion training checkpoint."""
    return _llama(*_describe(path_or_id))


def _describe(path_or_id) -> tuple:
    """(folder, config.json or None, checkpoint state or None): a Hugging Face folder has the first, an Orion
    checkpoint (state.json + model.safetensors) the second."""
    from orion.models.hub import read_config, resolve_model

    folder = resolve_model(str(path_or_id))
    if (folder / "config.json").is_file():
        return folder, read_config(folder), None
    return folder, None, _read_checkpoint_state(folder)


def _llama(folder, config: dict | None, state: dict | None, lazy: bool = False) -> tuple["LlamaConfig", Mapping]:
    """(config, Orion-named weights); ``lazy``: each weight read when it is asked for (every header checked now)."""
    from orion.models.hub import SafetensorsFile, load_weights, read_safetensors
    from orion.models.llama import LlamaConfig, config_from_hf, from_hf

    if state is not None:
        if "lora" in state:
            raise OrionError(f"{folder} holds a LoRA adapter, not a model; its base is {state['base']['path']}")
        weights = folder / "model.safetensors"
        return LlamaConfig(**state["config"]), SafetensorsFile(weights) if lazy else read_safetensors(weights)
    config_from_hf(config)  # a config Orion cannot run is refused before its weights are read
    return from_hf(config, load_weights(folder, lazy=lazy), lazy=lazy)


def _read_checkpoint_state(folder) -> dict:
    import json

    try:
        doc = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        state = doc["state"]
        state["config"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OrionError(f"{folder / 'state.json'} is not an Orion checkpoint state ({exc})") from None
    return state


def _has_tokenizer(folder) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model"))
