"""Core ML packages with state and with several functions, converted by coremltools at test time: a torch module
whose buffers are a KV cache updated in place (``states=[ct.StateType(...)]``, iOS18) runs on the emulator with its
state kept between calls, and a multifunction package (``ct.utils.save_multifunction``: prefill and decode sharing
one weight file) runs each function by name; both against torch, never against the emulator."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from orion.cli.main import cli  # noqa: E402
from orion.errors import MILProgramError  # noqa: E402
from orion.mil.mlpackage import read_mlpackage  # noqa: E402
from orion.mil.parse import parse_functions  # noqa: E402
from orion.runtime.backends.emulator import load_program  # noqa: E402

D, L = 8, 6  # model width, cache length


def _close(got, want, what):
    """Within fp16 storage of every intermediate, over a few ops."""
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2 * max(1, np.abs(want).max()),
                               err_msg=what)


def _norm(width):
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():  # at their init (1 and 0) a dropped gain or bias would pass
        norm.weight.copy_(1 + 0.2 * torch.randn(width))
        norm.bias.copy_(0.2 * torch.randn(width))
    return norm


def _convert(module, example, inputs, **kwargs):
    return ct.convert(torch.jit.trace(module, example), inputs=inputs, convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18, **kwargs)


class KVStep(torch.nn.Module):
    """One decode step: the normed token's key and value go into their caches at ``pos`` (slice assignment on the
    buffers), the query attends over every cached position, plus the residual."""

    def __init__(self):
        super().__init__()
        self.norm = _norm(D)
        self.q, self.k, self.v = (torch.nn.Linear(D, D) for _ in range(3))
        self.register_buffer("k_cache", torch.zeros(1, L, D))
        self.register_buffer("v_cache", torch.zeros(1, L, D))

    def forward(self, x, pos):
        h = self.norm(x)
        p = pos[0]
        self.k_cache[:, p:p + 1, :] = self.k(h)
        self.v_cache[:, p:p + 1, :] = self.v(h)
        scores = self.q(h) @ self.k_cache.transpose(1, 2) / math.sqrt(D)
        return torch.softmax(scores, dim=-1) @ self.v_cache + x


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    torch.manual_seed(11)
    module = KVStep().eval()
    fresh = copy.deepcopy(module)  # the torch reference starts from the same empty caches as each emulated run
    example = (torch.randn(1, 1, D), torch.tensor([0], dtype=torch.int32))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=(1, L, D)), name=name) for name in ("k_cache", "v_cache")]
    model = _convert(module, example, [ct.TensorType(name="x", shape=(1, 1, D)),
                                       ct.TensorType(name="pos", shape=(1,), dtype=np.int32)], states=states)
    path = tmp_path_factory.mktemp("stateful") / "kv.mlpackage"
    model.save(str(path))
    return path, fresh


def _steps(module, program, positions, rng):
    """Run ``positions`` through both, comparing every output and both caches after every call."""
    for pos in positions:
        x = rng.normal(size=(1, 1, D)).astype(np.float16)
        with torch.no_grad():
            want = module(torch.from_numpy(x.astype(np.float32)), torch.tensor([pos], dtype=torch.int32)).numpy()
        (name, _), = program.outputs
        _close(program.run({"x": x, "pos": np.array([pos], np.int32)})[name], want, f"output at position {pos}")
        for cache in ("k_cache", "v_cache"):
            _close(program.state[cache], getattr(module, cache).numpy(), f"{cache} after position {pos}")


def test_a_stateful_package_declares_its_buffers_as_state(stateful):
    text, model = read_mlpackage(stateful[0])
    (program,) = parse_functions(text, str(model)).values()
    assert program.states == ("k_cache", "v_cache")
    assert "state<tensor<fp16, [1, 6, 8]>> k_cache" in text
    assert {"read_state", "write_state", "slice_update"} <= {st.op for st in program.statements}


def test_a_stateful_package_keeps_its_caches_between_calls_as_torch_does(stateful):
    path, fresh = stateful
    program = load_program(path)
    assert [name for name, _ in program.inputs] == ["x", "pos"]  # the caches are state, not inputs
    module = copy.deepcopy(fresh)
    rng = np.random.default_rng(3)
    _steps(module, program, [0, 1, 3, 1, 2], rng)  # out of order, 1 written again (a rollback), 4 and 5 empty
    assert not program.state["k_cache"][:, 4:].any() and program.state["k_cache"][:, 3].any()
    program.reset_state()
    _steps(copy.deepcopy(fresh), program, [5, 0], rng)


class Block(torch.nn.Module):
    """Prefill (a whole prompt) and decode (one token) over one shared linear layer and norm."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(D, 2 * D)
        self.norm = _norm(2 * D)


class Prefill(Block):
    def forward(self, x):
        return torch.relu(self.norm(self.fc(x)))


class Decode(Block):
    def forward(self, x):
        return torch.tanh(self.norm(self.fc(x))) * 2 - x.sum(-1, keepdim=True)


SHAPES = {"prefill": (4, D), "decode": (1, D)}


@pytest.fixture(scope="module")
def multifunction(tmp_path_factory):
    torch.manual_seed(12)
    prefill = Prefill().eval()
    decode = Decode().eval()
    decode.load_state_dict(prefill.state_dict())  # the same weights: stored once in the package
    folder = tmp_path_factory.mktemp("multifunction")
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, module in (("prefill", prefill), ("decode", decode)):
        example = torch.randn(*SHAPES[name])
        _convert(module, example, [ct.TensorType(name="x", shape=SHAPES[name])]).save(str(folder / f"{name}.mlpackage"))
        descriptor.add_function(str(folder / f"{name}.mlpackage"), src_function_name="main",
                                target_function_name=name)
    descriptor.default_function_name = "decode"
    ct.utils.save_multifunction(descriptor, str(folder / "both.mlpackage"))
    return folder / "both.mlpackage", {"prefill": prefill, "decode": decode}


def test_a_multifunction_package_reads_as_one_text_whose_functions_share_the_weights(multifunction):
    text, model = read_mlpackage(multifunction[0])
    functions = parse_functions(text, str(model))
    assert list(functions) == ["prefill", "decode"]  # the order the package lists them in
    refs = [{(ref.path, ref.offset) for _, ref in functions[name].blob_refs()} for name in functions]
    assert refs[0] and refs[0] == refs[1]  # one weight file, the same records


def test_each_function_of_a_multifunction_package_runs_by_name_as_torch(multifunction):
    path, modules = multifunction
    rng = np.random.default_rng(4)
    for name, module in modules.items():
        program = load_program(path, function=name)
        x = rng.normal(size=SHAPES[name]).astype(np.float16)
        with torch.no_grad():
            want = module(torch.from_numpy(x.astype(np.float32))).numpy()
        (out, _), = program.outputs
        _close(program.run({"x": x})[out], want, name)
    with pytest.raises(MILProgramError, match="has functions prefill, decode and no main; name the one to run"):
        load_program(path)


def test_cli_checks_every_function_and_runs_one_by_name(multifunction, tmp_path):
    path, modules = multifunction
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert "function prefill:" in result.output and "function decode:" in result.output, result.output
    x = np.random.default_rng(5).normal(size=SHAPES["decode"]).astype(np.float16)
    np.savez(tmp_path / "in.npz", x=x)
    result = CliRunner().invoke(cli, ["run", str(path), "--function", "decode", "--inputs", str(tmp_path / "in.npz"),
                                      "--out", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out, torch.no_grad():
        (got,) = out.values()
        _close(got, modules["decode"](torch.from_numpy(x.astype(np.float32))).numpy(), "decode via the CLI")
