"""Read MIL text (either dialect) into a :class:`~orion.mil.program.Program`.

A hand-written tokenizer and recursive-descent parser, so every error can point at the exact token at fault.
The grammar accepted (whitespace and ``//`` comments allowed between any two tokens)::

    program    := "program" "(" ("1.3" | "1.0") ")" [ "[" "buildInfo" "=" dict "]" ] "{" function+ "}"
    dict       := "dict" "<" strtype "," strtype ">" "(" "{" [ "{" STRING "," STRING "}" , ... ] "}" ")"
    function   := "func" IDENT "<" iosNN ">" "(" [ param , ... ] ")" "{" statement* "}"
                  "->" "(" IDENT , ... ")" ";"
    param      := type IDENT | "state" "<" type ">" IDENT           (a state: stateful programs, KV caches)
    statement  := [ results "=" ] IDENT "(" [ IDENT "=" argument , ... ] ")" [ "[" [ IDENT "=" literal , ... ] "]" ] ";"
                  (no results: write_state)
    results    := type IDENT , ... | "(" type IDENT , ... ")"     (several for ops such as split)
    argument   := IDENT | literal | "true" | "false" | "[" [ number , ... ] "]" | "(" IDENT , ... ")"
    type       := "tensor" "<" dtype "," "[" [ INT , ... ] "]" ">" | dtype
    literal    := type "(" value ")"
    value      := number | "[" [ number , ... ] "]" | STRING | blob
    blob       := "BLOBFILE" "(" "path" "=" literal "," "offset" "=" literal ")"   (the two parts in either order)

Decisions, for what public MIL text does and does not show:

* identifiers are ``[A-Za-z_][A-Za-z0-9_]*`` (coremltools sanitizes every name to that); the type names, ``true``,
  ``false``, ``program``, ``func`` ... are reserved, as in coremltools, and cannot name a variable;
* numbers: decimal integers, decimal floats with exponents, C99 hex floats (``0x1.6ap-3``, which compiled
  ``model.mil`` files use), and ``inf`` / ``-inf`` (``tensor<fp16, []>(-inf)`` appears in compiled models);
  ``nan`` is refused, and so is a finite value too large for its type (it would silently become inf);
* decimal text is rounded to double and then to fp16/fp32; this double rounding differs from exact rounding only for
  decimals within 2**-53 (relative) of a half-way point, which printed programs never contain;
* tensor values are a flat list (``[0,1,3,2]``) of exactly the declared element count; nested lists are not accepted
  (no public MIL text was seen using them);
* an operand may be an inline literal (``y = fp16(0x1p-12)``), a bare ``true`` or ``false`` (a bool, as in
  ``matmul(x = q, y = k, transpose_y = true)`` of public ANE probes) or an untyped list (``axes = [1]``: int32, bool or
  fp32, as coremltools types a Python list); all stay inline in the :class:`Program`, as the constraint catalog
  counts inline operands apart from named consts;
* ``const()`` and other statements need no ``[name = ...]``; a statement of an op with several results lists them
  as ``type a, type b = split(...)`` or ``(type a, type b) = split(...)``, both seen in public programs;
* strings accept the escapes ``\\"`` and ``\\\\`` only;
* one or more functions per program (``main`` plus others, as Core ML multifunction models ship prefill and
  decode), each its own scope of variable names, weights shared through the files their BLOBFILE constants name;
  no dynamic (``?``) dimensions; the ``program(1)`` / ``func main<CoreML8>`` header of
  files compiled by coremlc is refused (the printer cannot write it back).
"""

from __future__ import annotations

import bisect
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from orion.errors import MILProgramError, MILSyntaxError, UnsafePathError
from orion.mil.mlpackage import is_mlpackage, read_mlpackage
from orion.mil.program import (
    DIALECTS,
    MODEL_PATH,
    NUMPY_DTYPES,
    STRING,
    Argument,
    BlobRef,
    Literal,
    Program,
    Statement,
    TensorType,
    VarRef,
)

__all__ = ["parse_functions", "parse_program", "resolve_blob_path", "select_function"]

#: Names coremltools never gives a variable (its NameSanitizer list) because they are keywords of the text.
RESERVED = frozenset(
    "any bool program func tensor list dict tuple true false string bf16 fp16 fp32 fp64 int8 int16 int32 int64 "
    "uint8 uint16 uint32 uint64 state".split()
)
#: Words that begin a type (and so a literal) where an argument is expected.
_TYPE_WORDS = frozenset(NUMPY_DTYPES) | {STRING, "tensor"}
_FLOAT_DTYPES = ("fp16", "fp32")


# ---------------------------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident", "number", "string", "eof", or the punctuation itself: "(", "->", ...
    text: str
    line: int
    column: int
    value: str = ""  # a string token's contents, escapes resolved

    def describe(self) -> str:
        if self.kind == "eof":
            return "end of input"
        if self.kind == "string":
            return f"string {self.text}"
        return f"'{self.text}'"


_HEX_FLOAT = r"[+-]?0[xX](?:[0-9a-fA-F]+(?:\.[0-9a-fA-F]*)?|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+"
_DECIMAL = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_TOKEN_RE = re.compile(
    r"(?P<space>[ \t\r\n]+|//[^\n]*)"
    rf"|(?P<number>{_HEX_FLOAT}|{_DECIMAL}|[+-](?:inf|nan)(?![A-Za-z0-9_]))"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r'|(?P<string>"(?:[^"\\\n]|\\.)*")'
    r"|(?P<punct>->|[()\[\]{}<>,;=])"
)
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")
_ESCAPE_RE = re.compile(r"\\(.)")


class _Tokens:
    """The token list of one text, with the position of each token as 1-based line and column."""

    def __init__(self, text: str, where: str):
        self.where = where
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.items: list[_Token] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise self._refusal(text, pos)
            kind = m.lastgroup
            if kind != "space":
                line, column = self._position(pos)
                tok_text = m.group()
                if kind == "punct":
                    self.items.append(_Token(tok_text, tok_text, line, column))
                elif kind == "string":
                    self.items.append(_Token(kind, tok_text, line, column, self._unescape(tok_text, line, column)))
                else:
                    self.items.append(_Token(kind, tok_text, line, column))
            pos = m.end()
        line, column = self._position(len(text))
        self.items.append(_Token("eof", "", line, column))

    def _position(self, offset: int) -> tuple[int, int]:
        index = bisect.bisect_right(self._line_starts, offset) - 1
        return index + 1, offset - self._line_starts[index] + 1

    def _refusal(self, text: str, pos: int) -> MILSyntaxError:
        line, column = self._position(pos)
        if text[pos] == '"':
            return MILSyntaxError(f"expected a closing '\"' before the end of the line{self.where}", line, column)
        return MILSyntaxError(f"expected a MIL token, found the character {text[pos]!r}{self.where}", line, column)

    def _unescape(self, token: str, line: int, column: int) -> str:
        body = token[1:-1]
        for m in _ESCAPE_RE.finditer(body):
            if m.group(1) not in '"\\':
                raise MILSyntaxError(
                    f"expected the escape \\\" or \\\\ in a string, found \\{m.group(1)}{self.where}",
                    line, column + 1 + m.start(),
                )
        return _ESCAPE_RE.sub(r"\1", body)


# ---------------------------------------------------------------------------------------------------------------------
# Blob paths


def _blob_relative_path(blob_path: str, where: str) -> PurePosixPath:
    """The part of a BLOBFILE path after ``@model_path/``, refused if it could name a file outside the model."""
    if not blob_path.startswith(MODEL_PATH):
        raise UnsafePathError(
            f"{where}BLOBFILE path {blob_path!r} does not start with {MODEL_PATH!r}; "
            f"write weight paths as {MODEL_PATH}weights/<name>.bin"
        )
    rest = blob_path[len(MODEL_PATH):]
    if "\\" in rest or "\0" in rest:
        raise UnsafePathError(
            f"{where}BLOBFILE path {blob_path!r} contains a backslash or NUL; use '/' between folder names"
        )
    normal = posixpath.normpath(rest) if rest else "."
    if normal.startswith("/"):
        raise UnsafePathError(
            f"{where}BLOBFILE path {blob_path!r} is absolute after {MODEL_PATH!r}; "
            "remove the extra leading '/'"
        )
    if normal == ".":
        raise UnsafePathError(
            f"{where}BLOBFILE path {blob_path!r} names the model folder, not a file; add the weight file's name"
        )
    if normal == ".." or normal.startswith("../"):
        raise UnsafePathError(
            f"{where}BLOBFILE path {blob_path!r} does not name a file inside the model folder; "
            "remove the '..' parts"
        )
    return PurePosixPath(normal)


def read_mil_file(path: str | Path) -> tuple[str, Path]:
    """The MIL text of a ``.mil`` file, of ``model.mil`` in a model folder, or of a Core ML package's ML program
    (:mod:`orion.mil.mlpackage`), and the file's path: its folder is where the program's weight paths start."""
    root = Path(path)
    if is_mlpackage(root):
        return read_mlpackage(root)
    mil = root / "model.mil" if root.is_dir() else root
    if not mil.is_file():
        raise MILProgramError(f"no MIL program at {mil}")
    try:
        return mil.read_text(encoding="utf-8"), mil
    except UnicodeDecodeError as exc:
        raise MILProgramError(f"{mil} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def resolve_blob_path(model_dir: Path, blob_path: str) -> Path:
    """Join a BLOBFILE path to the model folder, refusing paths that would leave it (checked on the text only:
    symbolic links inside the folder are followed as the operating system does)."""
    return Path(model_dir).joinpath(*_blob_relative_path(blob_path, f"model folder {model_dir}: ").parts)


# ---------------------------------------------------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.where = "" if source == "<mil>" else f" (in {source})"
        self.tokens = _Tokens(text, self.where).items
        self.pos = 0
        #: variable name -> line of its definition (in the function being read)
        self.defined: dict[str, int] = {}
        #: function name -> line of its definition
        self.function_lines: dict[str, int] = {}

    # -- token helpers

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def next(self) -> _Token:
        tok = self.peek()
        if tok.kind != "eof":
            self.pos += 1
        return tok

    def at(self, kind: str, text: str | None = None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (text is None or tok.text == text)

    def error(self, expected: str, tok: _Token | None = None) -> MILSyntaxError:
        tok = tok or self.peek()
        return MILSyntaxError(f"expected {expected}, found {tok.describe()}{self.where}", tok.line, tok.column)

    def expect(self, kind: str, expected: str | None = None) -> _Token:
        if not self.at(kind):
            raise self.error(expected or f"'{kind}'")
        return self.next()

    def keyword(self, word: str, expected: str | None = None) -> _Token:
        if not self.at("ident", word):
            raise self.error(expected or f"'{word}'")
        return self.next()

    def identifier(self, expected: str) -> _Token:
        return self.expect("ident", expected)

    def variable_name(self, what: str) -> _Token:
        """A name being defined; refused if it is a keyword of the text."""
        tok = self.identifier(what)
        if tok.text in RESERVED:
            raise MILSyntaxError(
                f"expected {what}, found the reserved word '{tok.text}'; rename the variable{self.where}",
                tok.line, tok.column,
            )
        return tok

    def define(self, tok: _Token) -> None:
        first = self.defined.get(tok.text)
        if first is not None:
            raise MILProgramError(
                f"{self.source}, line {tok.line}: variable '{tok.text}' is defined twice (first on line {first}); "
                "give each variable its own name"
            )
        self.defined[tok.text] = tok.line

    def use_variable(self, tok: _Token) -> VarRef:
        if tok.text not in self.defined:
            raise MILProgramError(
                f"{self.source}, line {tok.line}: variable '{tok.text}' is used before it is defined; define it as a "
                "function input or in an earlier statement"
            )
        return VarRef(tok.text)

    def comma_list(self, close: str, item, expected_item: str) -> list:
        """``item (',' item)*`` up to ``close`` (consumed); empty lists allowed."""
        items = []
        if self.at(close):
            self.next()
            return items
        while True:
            items.append(item())
            if self.at(close):
                self.next()
                return items
            if not self.at(","):
                raise self.error(f"',' or '{close}' after {expected_item}")
            self.next()

    # -- program structure

    def program(self) -> list[Program]:
        self.keyword("program", "'program(1.3)' or 'program(1.0)' at the start of the text")
        self.expect("(")
        version = self.peek()
        if version.text not in DIALECTS:
            raise self.error("the program version 1.3 or 1.0")
        self.next()
        self.expect(")")
        build_info: dict[str, str] = {}
        if self.at("["):
            build_info = self.build_info()
        self.expect("{", "'{' opening the program body")
        functions = [self.function(version.text, build_info)]
        while self.at("ident", "func"):
            functions.append(self.function(version.text, build_info))
        self.expect("}", "'}' closing the program (or 'func' starting another function)")
        self.expect("eof", "end of input after the program")
        names = tuple(f.function for f in functions)
        for f in functions:
            f.functions = names
        return functions

    def function(self, version: str, build_info: dict[str, str]) -> Program:
        self.defined = {}  # each function is its own scope
        self.keyword("func", "'func' starting the function")
        name_tok = self.identifier("the function name")
        function = name_tok.text
        if function in self.function_lines:
            raise MILProgramError(f"{self.source}, line {name_tok.line}: function '{function}' is defined twice "
                                  f"(first on line {self.function_lines[function]}); give each function its own name")
        self.function_lines[function] = name_tok.line
        self.expect("<", "'<' before the opset (such as <ios18>)")
        opset = self.peek()
        if not (opset.kind == "ident" and re.fullmatch(r"ios[0-9]+", opset.text)):
            raise self.error("an opset such as ios18 or ios16")
        self.next()
        self.expect(">")
        self.expect("(", "'(' opening the parameter list")
        states: list[str] = []
        inputs = self.comma_list(")", lambda: self.parameter(states), "a parameter")
        self.expect("{", "'{' opening the function body")
        statements = []
        while not self.at("}"):
            if not (self.at("(") or self.at("ident") and (self.peek().text in _TYPE_WORDS or
                                                             self.peek(1).kind == "(")):
                raise self.error("a statement (starting with its type) or '}' closing the function")
            statements.append(self.statement())
        self.next()
        self.expect("->", "'->' before the function outputs")
        self.expect("(", "'(' opening the output list")
        output_tokens = self.comma_list(")", lambda: self.identifier("an output variable name"), "an output")
        if not output_tokens:
            raise self.error("at least one output variable name", self.tokens[self.pos - 1])
        self.expect(";", "';' after the function outputs")
        for tok in output_tokens:
            if tok.text not in self.defined:
                raise MILProgramError(
                    f"{self.source}, line {tok.line}: output '{tok.text}' is not defined in function {function}; "
                    "name a function input or a statement's variable"
                )
        return Program(
            inputs=inputs,
            states=tuple(states),
            statements=statements,
            outputs=[tok.text for tok in output_tokens],
            version=version,
            opset=opset.text,
            function=function,
            build_info=build_info,
        )

    def build_info(self) -> dict[str, str]:
        self.expect("[")
        self.keyword("buildInfo", "'buildInfo', the only program attribute")
        self.expect("=")
        self.keyword("dict", "'dict<string, string>'")
        self.expect("<")
        for closing in (",", ">"):
            tok = self.peek()
            if self.type_() != TensorType(STRING):
                raise self.error("the type string (or tensor<string, []>)", tok)
            self.expect(closing)
        self.expect("(")
        self.expect("{", "'{' opening the buildInfo entries")
        info: dict[str, str] = {}

        def entry() -> None:
            self.expect("{", "'{' opening a buildInfo entry")
            key = self.expect("string", "a string key")
            self.expect(",")
            value = self.expect("string", "a string value")
            self.expect("}", "'}' closing a buildInfo entry")
            if key.value in info:
                raise MILSyntaxError(f"expected a new key, found the repeated key {key.text}{self.where}",
                                     key.line, key.column)
            info[key.value] = value.value

        self.comma_list("}", entry, "a buildInfo entry")
        self.expect(")")
        self.expect("]", "']' closing the program attributes")
        return info

    def parameter(self, states: list[str]) -> tuple[str, TensorType]:
        """``type name``, or ``state<type> name`` (its name is added to ``states``)."""
        state = self.at("ident", "state")
        if state:
            self.next()
            self.expect("<", "'<' after state")
        if not (self.at("ident") and self.peek().text in _TYPE_WORDS):
            raise self.error("a parameter type such as tensor<fp16, [1, 64, 1, 64]>")
        t = self.type_()
        if state:
            self.expect(">", "'>' closing state<...>")
        name = self.variable_name("a parameter name")
        self.define(name)
        if state:
            states.append(name.text)
        return name.text, t

    def statement(self) -> Statement:
        first = self.peek()
        results = []
        if self.at("ident") and self.peek(1).kind == "(" and first.text not in _TYPE_WORDS:
            pass  # an op without results: write_state(input = k, data = v)
        elif self.at("("):  # (type a, type b) = split(...)
            self.next()
            results = self.comma_list(")", self.result, "a result")
            if not results:
                raise self.error("at least one result in the parentheses", self.tokens[self.pos - 1])
        else:  # type a, type b = split(...)
            results = [self.result()]
            while self.at(","):
                self.next()
                results.append(self.result())
        if results:
            self.expect("=", "'=' after the variable name")
        op = self.identifier("an operation name").text
        self.expect("(", f"'(' opening the arguments of {op}")
        args: dict[str, Argument] = {}
        self.comma_list(")", lambda: self.named(args, self.argument), "an argument")
        attrs: dict[str, Literal] = {}
        if self.at("["):
            self.next()
            self.comma_list("]", lambda: self.named(attrs, self.literal_only), "an attribute")
        self.expect(";", "';' ending the statement")
        for _, tok in results:
            self.define(tok)  # only now: a statement cannot use its own results
        if not results:
            return Statement(type=None, var="", op=op, args=args, attrs=attrs, line=first.line)
        (t, var_tok), *more = results
        return Statement(type=t, var=var_tok.text, op=op, args=args, attrs=attrs, line=first.line,
                         more_outputs=tuple((tok.text, rt) for rt, tok in more))

    def result(self) -> tuple[TensorType, _Token]:
        """``type var``: one result of a statement."""
        if not (self.at("ident") and self.peek().text in _TYPE_WORDS):
            raise self.error("a result type such as tensor<fp16, [1, 64, 1, 64]>")
        return self.type_(), self.variable_name("the statement's variable name")

    def named(self, into: dict, value) -> None:
        key = self.identifier("a parameter name")
        if key.text in into:
            raise MILSyntaxError(f"expected a new parameter name, found the repeated '{key.text}'{self.where}",
                                 key.line, key.column)
        self.expect("=", f"'=' after '{key.text}'")
        into[key.text] = value()

    def argument(self) -> Argument:
        tok = self.peek()
        if tok.kind == "(":
            self.next()
            items = self.comma_list(")", lambda: self.use_variable(self.identifier("a variable name")), "a variable")
            if not items:
                raise self.error("at least one variable in the tuple", self.tokens[self.pos - 1])
            return tuple(items)
        if tok.kind == "ident" and tok.text in _TYPE_WORDS:
            return self.literal()
        if tok.kind == "ident" and tok.text in ("true", "false"):
            self.next()
            return Literal(TensorType("bool"), np.array(tok.text == "true"))
        if tok.kind == "ident":
            return self.use_variable(self.next())
        if tok.kind == "[":
            return self.untyped_list()
        raise self.error("a variable name, a literal, a list of values or a tuple of variables")

    def untyped_list(self) -> Literal:
        """``[1, 2]`` without a type, as some tools write operands: a rank-1 tensor of int32 (all integers), bool
        (all true/false) or fp32 (any other number), the types coremltools gives such Python lists."""
        self.next()
        elements = self.comma_list("]", self.next_value_token, "a value")
        if elements and {tok.text for tok in elements} <= {"true", "false"}:
            dtype = "bool"
        elif all(tok.kind == "number" and _INTEGER_RE.fullmatch(tok.text) for tok in elements):
            dtype = "int32"
        else:
            dtype = "fp32"
        return Literal(TensorType(dtype, (len(elements),)), self.numbers(dtype, elements))

    def literal_only(self) -> Literal:
        if not (self.at("ident") and self.peek().text in _TYPE_WORDS):
            raise self.error('a literal such as string("name") or fp16(0.5)')
        return self.literal()

    # -- types and literals

    def type_(self) -> TensorType:
        tok = self.peek()
        if tok.kind == "ident" and tok.text != "tensor" and tok.text in _TYPE_WORDS:
            self.next()
            return TensorType(tok.text)
        self.keyword("tensor", "a type such as tensor<fp16, [1, 64, 1, 64]> or fp16")
        self.expect("<")
        dtype = self.peek()
        if not (dtype.kind == "ident" and (dtype.text in NUMPY_DTYPES or dtype.text == STRING)):
            raise self.error(f"an element type ({', '.join([*NUMPY_DTYPES, STRING])})")
        self.next()
        self.expect(",")
        opening = self.expect("[", "'[' opening the shape")
        shape = self.comma_list("]", self.dimension, "a dimension")
        if dtype.text == STRING and shape:
            raise MILSyntaxError(f"expected the shape [] for a string, found a shape of rank {len(shape)}{self.where}",
                                 opening.line, opening.column)
        self.expect(">")
        return TensorType(dtype.text, tuple(shape))

    def dimension(self) -> int:
        tok = self.peek()
        if not (tok.kind == "number" and tok.text.isdigit()):
            raise self.error("a dimension (a non-negative integer; dynamic shapes are not supported)")
        self.next()
        return int(tok.text)

    def literal(self) -> Literal:
        start = self.peek()
        t = self.type_()
        self.expect("(", f"'(' opening the value of {start.text}")
        value: np.ndarray | str | BlobRef
        if t.dtype != STRING and self.at("ident", "BLOBFILE"):
            value = self.blobfile()
        elif t.dtype == STRING:
            value = self.expect("string", 'a string in double quotes ("...")').value
        elif t.is_scalar:
            value = self.numbers(t.dtype, [self.next_value_token()]).reshape(())
        else:
            self.expect("[", f"'[' opening the {t.size} values of {t}")
            elements = self.comma_list("]", self.next_value_token, "a value")
            if len(elements) != t.size:
                raise MILSyntaxError(
                    f"expected {t.size} values for {t}, found {len(elements)}{self.where}", start.line, start.column
                )
            value = self.numbers(t.dtype, elements).reshape(t.shape)
        self.expect(")", f"')' closing the value of {start.text}")
        return Literal(t, value)

    def next_value_token(self) -> _Token:
        tok = self.peek()
        if tok.kind not in ("number", "ident"):
            raise self.error("a number, true or false")
        return self.next()

    def numbers(self, dtype: str, toks: list[_Token]) -> np.ndarray:
        """The values of ``toks`` as an array of ``dtype``, refusing anything the type cannot hold exactly."""
        np_dtype = NUMPY_DTYPES[dtype]
        if dtype == "bool":
            for tok in toks:
                if tok.text not in ("true", "false"):
                    raise self.error("true or false", tok)
            return np.array([tok.text == "true" for tok in toks], dtype=np_dtype)
        if dtype in _FLOAT_DTYPES:
            values = [self.float_value(tok) for tok in toks]
            with np.errstate(over="ignore"):
                array = np.array(values, dtype=np.float64).astype(np_dtype)
            for tok, x, y in zip(toks, values, array):
                if np.isinf(y) and not np.isinf(x):
                    raise MILSyntaxError(f"expected a value that fits {dtype}, found {tok.text}, which overflows it"
                                         f"{self.where}", tok.line, tok.column)
            return array
        info = np.iinfo(np_dtype)
        ints = []
        for tok in toks:
            if not (tok.kind == "number" and _INTEGER_RE.fullmatch(tok.text)):
                raise self.error(f"an integer ({dtype})", tok)
            n = int(tok.text)
            if not info.min <= n <= info.max:
                raise MILSyntaxError(f"expected an integer in [{info.min}, {info.max}] for {dtype}, found {n}"
                                     f"{self.where}", tok.line, tok.column)
            ints.append(n)
        return np.array(ints, dtype=np_dtype)

    def float_value(self, tok: _Token) -> float:
        text = tok.text.lower()
        if text.lstrip("+-") == "nan":
            raise MILSyntaxError(f"expected a number, found NaN, which MIL text cannot carry; use a finite value"
                                 f"{self.where}", tok.line, tok.column)
        if tok.kind == "number":
            return float.fromhex(text) if "x" in text else float(text)
        if tok.text == "inf":
            return float("inf")
        raise self.error("a number", tok)

    def blobfile(self) -> BlobRef:
        blob = self.next()
        self.expect("(", "'(' after BLOBFILE")
        parts: dict[str, Literal] = {}
        starts: dict[str, _Token] = {}

        def part() -> None:
            key = self.peek()
            if key.text not in ("path", "offset"):
                raise self.error("'path' or 'offset'")
            starts[key.text] = self.peek(2)
            self.named(parts, self.literal_only)

        self.comma_list(")", part, "a BLOBFILE part")
        for key, want in (("path", TensorType(STRING)), ("offset", TensorType("uint64"))):
            if key not in parts:
                raise MILSyntaxError(f"expected BLOBFILE to have '{key}=', found none{self.where}",
                                     blob.line, blob.column)
            if parts[key].type != want:
                tok = starts[key]
                raise MILSyntaxError(
                    f"expected a {want.dtype} literal for BLOBFILE {key}, found {parts[key].type}{self.where}",
                    tok.line, tok.column,
                )
        path = str(parts["path"].value)
        _blob_relative_path(path, f"{self.source}, line {blob.line}: ")
        return BlobRef(path, int(np.asarray(parts["offset"].value).item()))


def parse_functions(text: str, source: str = "<mil>") -> dict[str, Program]:
    """Every function of MIL text in the ``program(1.3)`` or ``program(1.0)`` dialect, by name, in text order.

    Raises :class:`MILSyntaxError` (with line and column of the token at fault) for text that does not parse,
    :class:`MILProgramError` for duplicate, undefined or unknown-output variables (or functions), and
    :class:`UnsafePathError` for a BLOBFILE path that could leave the model folder. ``source`` names the text in
    messages (a file name).
    """
    return {f.function: f for f in _Parser(text, source).program()}


def parse_program(text: str, source: str = "<mil>", function: str | None = None) -> Program:
    """One function of MIL text (see :func:`parse_functions`): ``function``, or by default the only one, or
    ``main`` where there are several (Core ML's default function)."""
    functions = parse_functions(text, source)
    return select_function(functions, function, source)


def select_function(functions: dict[str, Program], function: str | None, source: str = "<mil>") -> Program:
    """The function named ``function`` (None: the only one, or ``main``), or a one-line error naming the choices."""
    if function is None:
        if len(functions) == 1:
            return next(iter(functions.values()))
        function = "main"
        if function not in functions:
            raise MILProgramError(f"{source} has functions {', '.join(functions)} and no main; name the one to run "
                                  "(--function NAME)")
    if function not in functions:
        raise MILProgramError(f"{source} has no function {function!r}; it has {', '.join(functions)}")
    return functions[function]
