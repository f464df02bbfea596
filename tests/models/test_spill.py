"""Weights kept in a temporary file come back bit for bit, as new arrays, one item (or slice) at a time."""

from __future__ import annotations

import gc

import numpy as np

from orion.models.bench import random_gpt2_state
from orion.models.gpt2 import BlockWeights, GPT2, GPT2Config, gpt2_weights
from orion.models.spill import SpilledList, spilled_array


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_block(a: BlockWeights, b: BlockWeights) -> bool:
    return all(same(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))


def _arrays(block: BlockWeights) -> list[np.ndarray]:
    return [a for v in vars(block).values() for a in (v if isinstance(v, tuple) else (v,))]


def test_spilled_gpt2_blocks_read_back_as_the_folded_ones():
    config, state = random_gpt2_state(n_layer=3, n_embd=64, vocab_size=97, n_positions=64, seed=3)
    cfg = GPT2Config.from_hf(config)
    _, kept, _ = gpt2_weights(state, cfg)
    _, spilled, _ = gpt2_weights(state, cfg, spill=True)
    assert isinstance(spilled, SpilledList) and len(spilled) == len(kept) == 3
    assert all(same_block(spilled[i], kept[i]) for i in range(3))
    assert same_block(spilled[-1], kept[2])
    for got, want in zip(spilled[1:3], kept[1:3], strict=True):
        assert same_block(got, want)
    first = spilled[0]
    first.qkv_w[...] = 0  # each read is a new array: changing one changes nothing kept
    first.ln_1[0][...] = 0
    assert same_block(spilled[0], kept[0])
    gc.collect()
    model = GPT2(cfg, state, backend="emulator")
    assert isinstance(model.blocks, SpilledList) and all(same_block(model.blocks[i], kept[i]) for i in range(3))


def test_odd_dtypes_shapes_and_empty_arrays_round_trip():
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((3, 5)).astype(np.float32).T, rng.integers(-9, 9, 7).astype(np.int8),
              np.empty((0, 4), np.float16), np.float64(2.5) * np.ones(()), rng.standard_normal(11)]
    item = BlockWeights(*values[:4], values[4], values[0], values[1], values[3], (values[2], values[4]),
                        (values[0],) * 2)
    spilled = SpilledList([item, item])
    assert same_block(spilled[1], item) and same_block(spilled[0], item)


def test_lists_none_and_names_round_trip_and_one_field_reads_alone():
    """A Llama block's fields: lists of arrays, None, tuples of part names; ``field`` reads one of them."""
    from orion.models.bench import random_llama
    from orion.models.llama import inference_blocks

    config, weights = random_llama({"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                    "intermediate_size": 96, "vocab_size": 97}, seed=5)
    kept = inference_blocks(weights, config, max_axis=128)  # q/k/v split in five: lists of five
    spilled = inference_blocks(weights, config, max_axis=128, spill=True)
    assert isinstance(spilled, SpilledList) and len(kept[0].qkv_w) == 5 and kept[0].qkv_b is None
    for got, want in zip(spilled, kept, strict=True):
        for name, value in vars(want).items():
            assert same_value(getattr(got, name), value), name
    assert same_value(spilled.field(1, "norms"), kept[1].norms)
    assert same_value(spilled.field(-1, "qkv_parts"), kept[1].qkv_parts)
    spilled.field(0, "ffn_w")[0][...] = 0
    assert same_value(spilled[0].ffn_w, kept[0].ffn_w)


def same_value(a, b) -> bool:
    """Both None or the same name, or arrays of the same dtype, shape and bits, or tuples and lists of those."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b if a is None or isinstance(a, str) else same(a, b)


def test_a_spilled_array_is_a_read_only_map_of_the_same_bits():
    array = np.random.default_rng(1).standard_normal((37, 5)).astype(np.float32)
    mapped = spilled_array(array)
    assert isinstance(mapped, np.memmap) and same(np.asarray(mapped), array) and not mapped.flags.writeable
    array[...] = 0  # a copy: the caller's array is its own
    rows = mapped[[3, 3, 36]]
    assert rows.tobytes() == np.asarray(mapped)[[3, 3, 36]].tobytes() and rows.any()
