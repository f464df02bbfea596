"""A program's life on a backend: compile (or take a cached compile), load, run named inputs to named outputs,
update weights, unload. Every decision here is plain Python shared by all backends: the binding plan (which
surface is which input, one allocation size per side), the cache, the compile budget, the weight-update strategy.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Iterable

import numpy as np

from orion import __version__
from orion.compiler.analysis import IOPlan
from orion.compiler.compile import compile_graph, io_plan_of
from orion.compiler.constraints import check_program, raise_on_errors
from orion.compiler.passes import weights_to_inputs
from orion.compiler.targets import WEIGHT_UPDATES, Target, get_target
from orion.errors import BackendError, BindingError, CacheError, SettingsError
from orion.ir.graph import Graph, sanitize_name
from orion.mil.emit import MILModule
from orion.runtime.backends import requested_backend
from orion.runtime.backends.base import Backend, BackendModel
from orion.runtime.budget import PROCESS_BUDGET, CompileBudget
from orion.runtime.cache import ProgramCache, cache_key, default_program_cache, os_build
from orion.runtime.tensor import Tensor, check_input_names

def get_backend(name: str | Backend = "auto", target: Target | str = "default") -> Backend:
    """The backend ``name`` asks for (:data:`~orion.runtime.backends.BACKENDS`). ``auto`` is the one
    ``$ORION_BACKEND`` names when set, else the ANE where this machine has one (macOS on Apple silicon), else the
    emulator. ``ane`` never falls back: where there is no ANE it is an error naming why."""
    if isinstance(name, Backend):
        return name
    target = get_target(target)
    name, asked = requested_backend(name)
    if name in ("auto", "ane"):
        from orion.runtime.backends.ane import AneBackend

        if name == "ane" or AneBackend.available():
            try:
                return AneBackend(target)
            except BackendError as exc:
                raise BackendError(f"{asked}: {exc}") from None
    from orion.runtime.backends.emulator import EmulatorBackend

    return EmulatorBackend(target)


def backends_that_ran(programs: Iterable["Program"]) -> str:
    """The backend that executed these programs (``ane+emulator`` were it several; ``none`` before any ran): what
    summaries report, rather than the backend that was asked for."""
    return "+".join(sorted({p.backend.name for p in programs if p.evaluations})) or "none"


class Program:
    """``with Program.from_graph(graph) as p: out = p.run({"x": x})``. Safe to call from several threads."""

    def __init__(self, module: MILModule, *, backend: Backend | str = "auto", target: Target | str = "default",
                 cache: ProgramCache | None = None, budget: CompileBudget | None = None,
                 weight_inputs: Iterable[str] = (), weight_update: str | None = None):
        self.target = get_target(target)
        self.backend = get_backend(backend, self.target)
        self.module = module
        self.cache = cache if cache is not None else default_program_cache()
        self.budget = budget or PROCESS_BUDGET
        self.weight_update = weight_update or self.target.weight_update
        if self.weight_update not in WEIGHT_UPDATES:
            raise SettingsError(f"unknown weight update strategy {self.weight_update!r}; use one of {WEIGHT_UPDATES}")
        if module.program.states:
            raise SettingsError(f"the program has state inputs ({', '.join(module.program.states)}): the runtime "
                                "binds surfaces, not state buffers (ANE-43); run it with the emulator's load_program, "
                                "whose state persists between run() calls")
        functions = module.program.functions
        #: The function this program evaluates, of a text with several (None: a text of one function).
        self.function = module.program.function if len(functions) > 1 else None
        if self.function is not None and self.backend.name == "ane" and self.target.multi_function != "procedure-index":
            raise SettingsError(f"the program holds {len(functions)} functions ({', '.join(functions)}) and target "
                                f"{self.target.name!r} has multi_function={self.target.multi_function}: whether the ANE "
                                "runs such a program is unverified (ANE-42); use the emulator, or settle it with "
                                "`orion doctor --probe multi-function` and a target profile that says so")
        self.plan: IOPlan = io_plan_of(module, self.target)
        self._types = dict(module.program.inputs) | dict(module.program.output_types())
        self._weight_inputs = set(weight_inputs)
        self._lock = threading.RLock()
        self._stage = Path(tempfile.mkdtemp(prefix="orion-program-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._stage, True)
        module.write(self._stage)
        self.module = module.mapped(self._stage)  # the weights live in the staged files, not twice in memory
        self._model: BackendModel | None = None
        self._inputs = {name: self._tensor(name, self.plan.input_surface_bytes) for name, _ in self.plan.inputs}
        self._outputs = {name: self._tensor(name, self.plan.output_surface_bytes) for name, _ in self.plan.outputs}
        for name in self._weight_inputs & set(self._inputs):
            self._inputs[name].surface.resident = True  # a backend may keep what it derives until the next write
        self.compiles = 0
        self.cache_hits = 0
        self.evaluations = 0

    @classmethod
    def from_graph(cls, graph: Graph, *, target: Target | str = "default", weights_as_inputs: Iterable[str] = (),
                   check: bool = True, weights=None, **kwargs) -> "Program":
        """Compile ``graph`` for ``target``. ``weights_as_inputs`` names constants to pass as inputs instead (they
        start with the graph's values), or graph inputs to treat as weights (they start at zero); either kind is set
        with :meth:`update_weights` and is not part of :meth:`run`'s inputs. ``weights`` compresses the baked conv
        weights (``compile_graph``'s parameter: ``"int8"``, ``"int4/32"``, ``"lut4"`` ...)."""
        target = get_target(target)
        names = list(weights_as_inputs)
        graph_inputs = {v.name: v for v in graph.inputs}
        constants = [n for n in names if n not in graph_inputs]
        initial = {n.name: n.attrs["val"] for n in graph.nodes if n.is_const and n.name in set(constants)}
        initial |= {n: np.zeros(graph_inputs[n].shape, np.float32) for n in names if n in graph_inputs}
        if constants:
            graph = weights_to_inputs(constants)(graph)
        result = compile_graph(graph, target, weights=weights)
        if check:
            raise_on_errors(result.violations)
        program = cls(result.module, target=target, weight_inputs=names, **kwargs)
        program.update_weights(initial)  # the weights that became inputs start with the graph's values
        return program

    @classmethod
    def from_mil(cls, directory: str | Path, *, check: bool = True, function: str | None = None,
                 **kwargs) -> "Program":
        """A program from ``directory/model.mil`` and its weight files (written by Orion or another tool); of a text
        with several functions, the one named ``function`` (None: main)."""
        module = MILModule.read(directory, function)
        target = kwargs.pop("target", "default")
        target = get_target(target)
        if check:
            raise_on_errors(check_program(module.program, target))
        return cls(module, target=target, **kwargs)

    # -- life ------------------------------------------------------------------------------------------------------

    def _tensor(self, name: str, nbytes: int) -> Tensor:
        t = self._types[name]
        return Tensor(t.shape, t.dtype, self.backend.new_surface(nbytes))

    def _new_model(self) -> BackendModel:
        function = {} if self.function is None else {"function": self.function}  # backends of one function only
        return self.backend.new_model(self.module.text, self._weight_sources(), **function)

    def _weight_sources(self) -> dict[str, Path]:
        return {rel: self._stage / rel for rel in self.module.weight_files}

    def _key(self) -> str:
        return cache_key(mil_text=self.module.text, weight_names=self.module.weight_files, target=self.target.name,
                         backend=self.backend.name, orion_version=__version__, os_build=os_build())

    def load(self) -> "Program":
        """Compile (unless the cache has this program) and load. Idempotent."""
        with self._lock:
            if self._model is None:
                self._model = self._loaded_model()
            return self

    def _loaded_model(self) -> BackendModel:
        """A loaded model: from cached artifacts where they load, else compiled (and cached)."""
        model = self._new_model()
        key = self._key()
        try:
            artifacts = self.cache.get(key, disk=self.backend.loads_disk_cache())
            failed_load = False
            if artifacts is not None:
                try:
                    model.install_artifacts(artifacts)
                except BackendError:
                    artifacts = None  # this backend cannot reuse that compile for these weights (several files)
            if artifacts is not None:
                try:
                    model.load()
                    self.cache_hits += 1
                    return model
                except BackendError as exc:
                    failed_load = True
                    warnings.warn(f"the cached compile of program {model.identifier[:12]} did not load, compiling it "
                                  f"again: {exc}", RuntimeWarning, stacklevel=3)
            self.budget.charge(f"program {model.identifier[:12]}")
            model.compile()
            self.compiles += 1
            self._store(key, model, replace=failed_load)
            model.load()
        except BaseException:
            model.release()
            raise
        return model

    def _store(self, key: str, model: BackendModel, replace: bool) -> None:
        """Cache a compile; a compile that cannot be cached still runs (with a warning)."""
        try:
            self.cache.put(key, model.artifacts(), replace=replace)
        except (BackendError, CacheError) as exc:
            warnings.warn(f"program {model.identifier[:12]} compiled but was not cached: {exc}", RuntimeWarning,
                          stacklevel=4)

    def unload(self) -> None:
        with self._lock:
            if self._model is not None:
                model, self._model = self._model, None
                model.release()

    def close(self) -> None:
        """Unload, free the surfaces and remove the staging directory; safe to call twice. Never raises for a
        failed unload (a warning says what went wrong): results already read must not be lost to cleanup."""
        with self._lock:
            try:
                self.unload()
            except BackendError as exc:
                warnings.warn(f"closing the program anyway: {exc}", RuntimeWarning, stacklevel=2)
            for t in (*self._inputs.values(), *self._outputs.values()):
                t.surface.close()
            self._cleanup()

    def __enter__(self) -> "Program":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running -----------------------------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        """The inputs a caller gives to :meth:`run` (weights passed as inputs are set with update_weights)."""
        return [n for n, _ in self.plan.inputs if n not in self._weight_inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.plan.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs (any float dtype, declared shapes) to named outputs (declared dtype)."""
        with self._lock:
            check_input_names(self.input_names, inputs)
            for name in self.input_names:
                try:
                    self._inputs[name].write(inputs[name])
                except BindingError as exc:
                    raise BindingError(f"input {name!r}: {exc}") from None
            self.evaluate()
            return {name: self._outputs[name].read() for name in self.output_names}

    def input_tensor(self, name: str) -> Tensor:
        """The surface-backed tensor an input is read from: write into it (``with t.view() as v``) and call
        :meth:`evaluate`, for loops that change a small part of large inputs (a KV cache) without copying them."""
        try:
            return self._inputs[name]
        except KeyError:
            raise BindingError(f"no input named {name!r}; inputs: {sorted(self._inputs)}") from None

    def output_tensor(self, name: str) -> Tensor:
        try:
            return self._outputs[name]
        except KeyError:
            raise BindingError(f"no output named {name!r}; outputs: {sorted(self._outputs)}") from None

    def evaluate(self) -> None:
        """Run once on whatever the input tensors hold; results stay in the output tensors."""
        with self._lock:
            self.load()
            self._model.evaluate([self._inputs[n].surface for n, _ in self.plan.inputs],
                                 [self._outputs[n].surface for n, _ in self.plan.outputs])
            self.evaluations += 1

    # -- weights -----------------------------------------------------------------------------------------------

    def weight_names(self) -> list[str]:
        return sorted(set(self.module.weight_names) | self._weight_inputs)

    def update_weights(self, weights: dict[str, np.ndarray], strategy: str | None = None) -> None:
        """New values for named weights. Weights passed as inputs are written into their surfaces (no compile);
        baked weights follow ``strategy`` (default: the target's): ``reload``, ``patch`` or ``recompile``."""
        strategy = strategy or self.weight_update
        if strategy not in WEIGHT_UPDATES:
            raise SettingsError(f"unknown weight update strategy {strategy!r}; use one of {WEIGHT_UPDATES}")
        with self._lock:
            baked = {}
            for name, array in weights.items():
                name = sanitize_name(name)  # builder names ("fc.weight") are MIL names ("fc_weight") here
                if name in self._weight_inputs:
                    shape = self._types[name].shape
                    if np.size(array) != self._types[name].size:
                        raise BindingError(f"weight {name!r} has {np.size(array)} values; it takes {list(shape)}")
                    self._inputs[name].write(np.asarray(array).reshape(shape))
                elif name in self.module.weight_names:
                    baked[name] = array
                else:
                    raise BindingError(f"no weight named {name!r}; this program has {self.weight_names()}")
            if baked:
                if strategy == "inputs":
                    raise BindingError(f"weights {sorted(baked)} are baked into the program; compile it with "
                                       "weights_as_inputs=[...] to update them as inputs")
                self._update_baked(baked, strategy)

    def _update_baked(self, weights: dict[str, np.ndarray], strategy: str) -> None:
        changed = self.module.replace_weights(weights)
        self.module.write_weights(self._stage, changed)
        self.module = self.module.mapped(self._stage, changed)
        files = {rel: self._stage / rel for rel in changed}
        if self._model is None:
            return  # the next load builds from the new files
        if strategy == "reload":
            self._model.unload()
            self._model.write_weights(files)
            self._model.load()
        elif strategy == "patch":
            old = self._model
            artifacts = old.artifacts()
            new = self._new_model()  # same identifier, same dir
            new.install_artifacts(artifacts)
            old.unload()
            old.release(remove_directory=False)  # ownership of the directory passes to the new model
            self._model = new
            new.load()
        else:  # recompile
            old = self._model
            self._model = None
            old.release()
            self.budget.charge("a weight update (strategy recompile)")
            new = self._new_model()
            new.compile()
            self.compiles += 1
            self._model = new
            new.load()

