"""One validator: every program the emulator refuses fails ``orion check`` with a named rule and place, and every
program ``orion check`` passes runs in the emulator."""

import numpy as np
import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from orion.errors import OrionError
from orion.mil.blob import write_blob_file
from orion.mil.parse import parse_program
from orion.runtime.backends.emulator import load_program

X = "tensor<fp16, [1, 768, 1, 32]>"
HALF = "tensor<fp16, [1, 768, 1, 16]>"


def mil(params: str, body: str, outputs: str = "y") -> str:
    return f"program(1.3)\n{{\n    func main<ios18>({params}) {{\n{body}\n    }} -> ({outputs});\n}}\n"


def st(line: str) -> str:
    return f"        {line}"


EXP = st(f'{X} y = exp(x=x)[name=string("y")];')
WEIGHT = st(f'{X} w = const()[name=string("w"), val={X}(BLOBFILE(path=string("@model_path/weights/w.bin"), '
            'offset=uint64(OFFSET)))];')
# name -> (MIL text, weight file written?, the rule `orion check` must name, whether the emulator refuses it)
CASES = {
    "valid": (mil(f"{X} x", EXP), False, None, False),
    "inline literal operand": (mil(f"{X} x", st(f'{X} y = pow(x=x, y=fp16(2))[name=string("y")];')), False, None,
                               False),
    "shapes that do not broadcast": (mil(f"{X} x, {HALF} h", st(f'{X} y = add(x=x, y=h)[name=string("y")];')),
                                     False, "ANE-38", True),
    "declared shape not the op's": (mil(f"{X} x", st(f'{HALF} y = exp(x=x)[name=string("y")];')), False, "ANE-38",
                                    True),
    "declared dtype not the op's": (mil(f"{X} x", st('tensor<fp32, [1, 768, 1, 32]> y = exp(x=x)[name=string("y")];')),
                                    False, "ANE-38", True),
    "unknown parameter": (mil(f"{X} x", st(f'{X} y = exp(x=x, gamma=x)[name=string("y")];')), False, "ANE-38", True),
    "missing input": (mil(f"{X} x", st(f'{X} y = add(x=x)[name=string("y")];')), False, "ANE-38", True),
    "parameter not a const": (mil(f"{X} x", st(f'{X} y = softmax(axis=x, x=x)[name=string("y")];')), False, "ANE-38",
                              True),
    "tuple for a single input": (mil(f"{X} x", st(f'{X} y = add(x=(x, x), y=x)[name=string("y")];')), False,
                                 "ANE-38", True),
    "one variable for the values tuple": (mil(f"{X} x", st('int32 ax = const()[name=string("ax"), val=int32(3)];') + "\n"
                                             + st('bool il = const()[name=string("il"), val=bool(false)];') + "\n"
                                             + st(f'{X} y = concat(axis=ax, interleave=il, values=x)'
                                                  '[name=string("y")];')), False, "ANE-38", True),
    "axis out of range": (mil(f"{X} x", st('int32 ax = const()[name=string("ax"), val=int32(4)];') + "\n"
                              + st(f'{X} y = softmax(axis=ax, x=x)[name=string("y")];')), False, "ANE-38", True),
    "cast to a type MIL lacks": (mil(f"{X} x", st('string d = const()[name=string("d"), val=string("fp64")];') + "\n"
                                     + st(f'{X} y = cast(dtype=d, x=x)[name=string("y")];')), False, "ANE-38", True),
    "const of another type than declared": (
        mil(f"{X} x", st('fp16 c = const()[name=string("c"), val=fp32(2)];') + "\n"
            + st(f'{X} y = mul(x=x, y=c)[name=string("y")];')), False, "ANE-38", True),
    "string input": (mil(f"{X} x, string s", EXP), False, "ANE-23", True),
    "string output": (mil(f"{X} x", st('string s = const()[name=string("s"), val=string("a")];'), "s"), False,
                      "ANE-23", True),
    "int32 input": (mil(f"tensor<int32, [1, 768, 1, 32]> x",
                        st('string d = const()[name=string("d"), val=string("fp16")];') + "\n"
                        + st(f'{X} y = cast(dtype=d, x=x)[name=string("y")];')), False, "ANE-23", False),
    "rank 6": (mil(f"{X} x", st('tensor<int32, [6]> s6 = const()[name=string("s6"), '
                                'val=tensor<int32, [6]>([1, 768, 1, 2, 4, 4])];') + "\n"
                   + st('tensor<fp16, [1, 768, 1, 2, 4, 4]> y = reshape(shape=s6, x=x)[name=string("y")];')), False,
               "ANE-24", False),
    "unknown op": (mil(f"{X} x", st(f'{X} y = frobnicate(x=x)[name=string("y")];')), False, "ANE-34", True),
    "weights": (mil(f"{X} x", WEIGHT.replace("OFFSET", "64") + "\n" + st(f'{X} y = add(x=x, y=w)[name=string("y")];')),
                True, None, False),
    "weight file missing": (mil(f"{X} x", WEIGHT.replace("OFFSET", "64") + "\n"
                                + st(f'{X} y = add(x=x, y=w)[name=string("y")];')), False, "ANE-40", True),
    "weight record not at the offset": (mil(f"{X} x", WEIGHT.replace("OFFSET", "192") + "\n"
                                            + st(f'{X} y = add(x=x, y=w)[name=string("y")];')), True, "ANE-40", True),
}


def _feed(program) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for name, t in program.inputs:
        if t.dtype in ("fp16", "fp32"):
            feed[name] = rng.standard_normal(t.shape).astype(np.float32)
        elif t.dtype in ("int32", "int16", "int8"):
            feed[name] = rng.integers(-100, 100, t.shape).astype(t.numpy_dtype)
        else:
            feed[name] = np.zeros(t.shape, dtype=np.float32)  # a type nothing binds: the emulator must say so
    return feed


@pytest.mark.parametrize("case", CASES)
def test_check_fails_every_program_the_emulator_refuses(case, tmp_path):
    text, weights, rule, refused = CASES[case]
    (tmp_path / "model.mil").write_text(text)
    if weights:
        (tmp_path / "weights").mkdir()
        write_blob_file(tmp_path / "weights" / "w.bin", [np.full((1, 768, 1, 32), 0.25, np.float16)])
    try:
        program = load_program(tmp_path)
        program.run(_feed(program))
        emulator_refusal = None
    except OrionError as exc:
        emulator_refusal = str(exc)
    result = CliRunner().invoke(cli, ["check", str(tmp_path)])
    report = " ".join(result.output.split())
    assert (emulator_refusal is not None) == refused, emulator_refusal
    if rule is None:
        assert result.exit_code == 0 and "no violations" in report, report
        return
    assert result.exit_code == 1 and rule in report, report  # a violation named by its rule ...
    if emulator_refusal is not None and "line " in emulator_refusal:  # ... at the line the emulator names
        place = emulator_refusal.split(":")[0].split(" (")[0]
        assert place in report, (place, report)


def test_every_case_parses():
    """The cases are about what follows parsing: each is well-formed text (the parser's refusals are shared)."""
    for text, *_ in CASES.values():
        parse_program(text)
