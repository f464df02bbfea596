"""Stateful programs (iOS18): ``state<tensor<...>>`` inputs read with ``read_state`` and replaced with ``write_state``
(or coremltools' ``coreml_update_state``), a KV cache updated at a position with ``slice_update``, run by the emulator
with the state kept between calls, against a numpy cache over several calls."""

from __future__ import annotations

import numpy as np
import pytest

from orion.compiler.constraints import check_program
from orion.compiler.targets import get_target
from orion.errors import MILProgramError, SettingsError
from orion.mil.parse import parse_program
from orion.runtime.backends.emulator import load_text
from tests.runtime.op_oracles import mil_literal

H, L, D = 2, 6, 4  # heads, cache length, head size

#: One decode step as coremltools' stateful KV caches write it: the new key and value go into their caches at
#: ``pos`` (begin/end computed from it), the caches are written back, and the output attends over the key cache
#: (a plain product here: scores of q against every cached key, times the cached values).
KV_STEP = f"""program(1.3)
[buildInfo = dict<string, string>({{{{"coremltools-version", "9.0"}}}})]
{{
    func main<ios18>(state<tensor<fp16, [1, {H}, {L}, {D}]>> k_cache, state<tensor<fp16, [1, {H}, {L}, {D}]>> v_cache, tensor<int32, [1]> pos, tensor<fp16, [1, {H}, 1, {D}]> k, tensor<fp16, [1, {H}, 1, {D}]> q, tensor<fp16, [1, {H}, 1, {D}]> v) {{
        tensor<int32, [2]> zeros2 = const()[name = string("zeros2"), val = tensor<int32, [2]>([0, 0])];
        tensor<int32, [1]> zero = const()[name = string("zero"), val = tensor<int32, [1]>([0])];
        int32 axis0 = const()[name = string("axis0"), val = int32(0)];
        tensor<int32, [4]> begin = concat(axis = axis0, values = (zeros2, pos, zero))[name = string("begin")];
        tensor<int32, [4]> step = const()[name = string("step"), val = tensor<int32, [4]>([1, {H}, 1, {D}])];
        tensor<int32, [4]> end = add(x = begin, y = step)[name = string("end")];
        tensor<fp16, [1, {H}, {L}, {D}]> k_old = read_state(input = k_cache)[name = string("k_old")];
        tensor<fp16, [1, {H}, {L}, {D}]> k_new = slice_update(begin = begin, end = end, update = k, x = k_old)[name = string("k_new")];
        write_state(data = k_new, input = k_cache)[name = string("k_write")];
        tensor<fp16, [1, {H}, {L}, {D}]> v_old = read_state(input = v_cache)[name = string("v_old")];
        tensor<fp16, [1, {H}, {L}, {D}]> v_new = slice_update(begin = begin, end = end, update = v, x = v_old)[name = string("v_new")];
        tensor<fp16, [1, {H}, {L}, {D}]> v_now = coreml_update_state(state = v_cache, value = v_new)[name = string("v_now")];
        tensor<fp16, [1, {H}, {L}, {D}]> keys = read_state(input = k_cache)[name = string("keys")];
        bool ty = const()[name = string("ty"), val = bool(true)];
        bool tn = const()[name = string("tn"), val = bool(false)];
        tensor<fp16, [1, {H}, 1, {L}]> scores = matmul(transpose_x = tn, transpose_y = ty, x = q, y = keys)[name = string("scores")];
        tensor<fp16, [1, {H}, 1, {D}]> out = matmul(transpose_x = tn, transpose_y = tn, x = scores, y = v_now)[name = string("out")];
    }} -> (out);
}}
"""


def _step_inputs(rng, pos):
    return {"pos": np.array([pos], np.int32),
            **{name: rng.normal(size=(1, H, 1, D)).astype(np.float16) for name in ("k", "q", "v")}}


def test_a_kv_cache_keeps_its_state_between_calls(tmp_path):
    program = load_text(KV_STEP, tmp_path)
    assert [name for name, _ in program.inputs] == ["pos", "k", "q", "v"]  # states are not bound as inputs
    rng = np.random.default_rng(5)
    k_ref = np.zeros((1, H, L, D), np.float64)
    v_ref = np.zeros((1, H, L, D), np.float64)
    for pos in (0, 1, 2, 4):  # position 3 stays empty
        feed = _step_inputs(rng, pos)
        out = program.run(feed)["out"]
        k_ref[:, :, pos] = feed["k"][:, :, 0]
        v_ref[:, :, pos] = feed["v"][:, :, 0]
        scores = (feed["q"].astype(np.float64) @ np.swapaxes(k_ref, -1, -2)).astype(np.float16)
        want = scores.astype(np.float64) @ v_ref
        np.testing.assert_allclose(out.astype(np.float64), want, rtol=4e-3, atol=4e-3)
        np.testing.assert_array_equal(program.state["k_cache"], k_ref.astype(np.float16))
        np.testing.assert_array_equal(program.state["v_cache"], v_ref.astype(np.float16))
    assert not program.state["k_cache"][:, :, 3].any() and program.state["k_cache"][:, :, 4].any()
    program.reset_state()
    assert not program.state["k_cache"].any() and not program.state["v_cache"].any()
    feed = _step_inputs(rng, 5)
    program.run(feed)
    assert set(np.flatnonzero(program.state["k_cache"].any(axis=(0, 1, 3)))) == {5}  # only the new position


def test_a_position_outside_the_cache_stops_the_run_by_name(tmp_path):
    program = load_text(KV_STEP, tmp_path)
    with pytest.raises(Exception, match=r"slice_update: update has shape \[1, 2, 1, 4\] but begin \[0, 0, 6, 0\]"):
        program.run(_step_inputs(np.random.default_rng(0), L))


@pytest.mark.parametrize("params, shape", [
    ({"begin": [0, 1, 2], "end": [2, 3, 5]}, (2, 2, 3)),
    ({"begin": [0, 0, 1], "end": [2, 4, 7], "stride": [1, 2, 3]}, (2, 2, 2)),
    ({"begin": [1, 0, 3], "end": [2, 4, 4], "squeeze_mask": [True, False, True]}, (4,)),
    ({"begin": [0, 2, 0], "end": [0, 4, 6], "begin_mask": [True, False, True], "end_mask": [True, False, False]},
     (2, 2, 6)),
])
def test_slice_update_matches_coremltools(tmp_path, coreml, params, shape):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 4, 7)).astype(np.float16)
    update = rng.normal(size=shape).astype(np.float16)
    const_params = {k: v for k, v in params.items()}
    oracle = coreml("slice_update", x=x.astype(np.float32), update=update.astype(np.float32),
                    **{k: np.array(v, np.int32) if k in ("begin", "end") else
                       (np.array(v, np.int32) if k == "stride" else np.array(v, bool)) for k, v in const_params.items()})
    lines = []
    for name, value in const_params.items():
        if isinstance(value[0], bool):
            t = f"tensor<bool, [{len(value)}]>"
            lit = f"{t}([{', '.join(str(v).lower() for v in value)}])"
        else:
            t, lit = mil_literal(value)
        lines.append(f'        {t} p_{name} = const()[name=string("p_{name}"), val={lit}];')
    args = ", ".join([f"{name}=p_{name}" for name in const_params] + ["update=u", "x=x"])
    text = (f"program(1.3)\n{{\n    func main<ios18>(tensor<fp16, [2, 4, 7]> x, tensor<fp16, {list(shape)}> u) {{\n"
            + "\n".join(lines) + f'\n        tensor<fp16, [2, 4, 7]> out = slice_update({args})[name=string("out")];\n'
            "    } -> (out);\n}\n")
    got = load_text(text, tmp_path).run({"x": x, "u": update})["out"]
    np.testing.assert_array_equal(got, oracle.astype(np.float16))
    assert not np.array_equal(got, x)


STATE_MISUSE = """program(1.3)
{
    func main<ios18>(state<tensor<fp16, [1, 4]>> s, tensor<fp16, [1, 4]> x) {
        BODY
    } -> (y);
}
"""


@pytest.mark.parametrize("body, message", [
    ("tensor<fp16, [1, 4]> y = add(x=s, y=x);", r"add reads the state 's' directly; read it with read_state"),
    ("tensor<fp16, [1, 4]> y = read_state(input=x);", r"read_state input 'input' must be a state .* not 'x'"),
    ("tensor<fp16, [1, 2]> h = slice_by_size(x=x, begin=[0, 0], size=[1, 2]);\n        write_state(input=s, data=h);\n"
     "        tensor<fp16, [1, 4]> y = read_state(input=s);",
     r"line 5 \(write_state ''\): write_state: the value tensor<fp16, \[1, 2\]> is not of the state's type"),
])
def test_state_misuse_is_refused_by_line(tmp_path, body, message):
    text = STATE_MISUSE.replace("BODY", body)
    with pytest.raises(MILProgramError, match=message):
        load_text(text, tmp_path)
    assert "ANE-38" in {v.constraint for v in check_program(parse_program(text), get_target("default"))}


def test_a_stateful_program_prints_back_and_is_flagged_unverified_on_the_ane():
    program = parse_program(KV_STEP)
    assert program.states == ("k_cache", "v_cache")
    again = parse_program(program.to_text())
    assert again.states == program.states and again.statements == program.statements
    assert "write_state(data=k_new, input=k_cache)" in program.to_text()
    found = check_program(program, get_target("default"))
    flagged = {v.where for v in found if v.constraint == "ANE-43"}
    assert flagged == {"input 'k_cache'", "input 'v_cache'"}
    assert "ANE-38" not in {v.constraint for v in found}


def test_the_runtime_refuses_a_stateful_program_by_name(tmp_path):
    from orion.runtime.program import Program

    (tmp_path / "model.mil").write_text(KV_STEP)
    with pytest.raises(SettingsError, match=r"state inputs \(k_cache, v_cache\).*ANE-43.*load_program"):
        Program.from_mil(tmp_path, backend="emulator", check=False)
