"""The probe registry: what a probe is and where it registers, and the strict-JSON form of its observations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from orion.errors import SettingsError


@dataclass(frozen=True)
class Probe:
    """One question for the hardware. ``settles`` names catalog ids, :class:`Target` fields and ``numerics.<name>``
    settings; ``run`` returns JSON-ready observations; ``verdict`` maps them to ``(verdict, {setting: value})``
    (an empty dict when the observations decide no setting). Hidden probes run only when asked for by id."""

    id: str
    settles: tuple[str, ...]
    question: str
    run: Callable[[Any], dict]
    verdict: Callable[[dict], tuple[str, dict]]
    hidden: bool = False


PROBES: dict[str, Probe] = {}


def register(probe: Probe) -> Probe:
    if probe.id in PROBES:
        raise SettingsError(f"probe id {probe.id!r} is registered twice; give the new probe another id")
    PROBES[probe.id] = probe
    return probe


# ---------------------------------------------------------------------------------------------------------------------
# JSON-ready numbers: inf and NaN as strings, so reports stay strict JSON.


def _num(x: Any) -> Any:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _nums(a: Any) -> list:
    return [_num(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def jsonable(obj: Any) -> Any:
    """Observations as strict JSON: numpy scalars to Python, non-finite floats to strings, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _decode(values: Any) -> np.ndarray:
    items = values if isinstance(values, list) else [values]
    return np.asarray([float(v) if isinstance(v, str) else v for v in items], dtype=np.float64)


#: The longest error text a report keeps; the framework's NSError text is a finding, so anything shorter is verbatim.
ERROR_KEPT = 20000


def _error(exc: BaseException) -> str:
    """``Type: message`` verbatim (line breaks and all), cut only past :data:`ERROR_KEPT` characters."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) <= ERROR_KEPT:
        return text
    return f"{text[:ERROR_KEPT]} ... [{len(text) - ERROR_KEPT} more characters]"
