"""orion.mil.validate: the dialect-dependent rule (ios16's cast takes fewer types than ios18's)."""

import pytest

from orion.mil.parse import parse_program
from orion.mil.validate import validate_program


def _cast_program(version: str, opset: str, dtype: str) -> str:
    string = 'tensor<string, []>' if version == "1.0" else "string"
    return (f"program({version})\n{{\n    func main<{opset}>(tensor<fp16, [1, 4]> x) {{\n"
            f'        {string} d = const()[name={string}("d"), val={string}("{dtype}")];\n'
            f'        tensor<{dtype}, [1, 4]> y = cast(dtype=d, x=x)[name={string}("y")];\n'
            "    } -> (y);\n}\n")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_ios16_casts_only_to_its_types(dtype):
    problems = validate_program(parse_program(_cast_program("1.0", "ios16", dtype))).problems
    assert [str(p) for p in problems] == [f"line 5 (cast 'y'): cast to {dtype} needs the ios17 opset or later; "
                                          "ios16 casts to fp16, fp32, int32, bool"]
    assert validate_program(parse_program(_cast_program("1.3", "ios18", dtype))).problems == []


def test_ios16_casts_to_int32():
    assert validate_program(parse_program(_cast_program("1.0", "ios16", "int32"))).problems == []
