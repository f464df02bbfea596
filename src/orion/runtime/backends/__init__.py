"""Where programs run: ``ane`` (the Apple Neural Engine through the private framework) and ``emulator`` (numpy).

:data:`BACKENDS` is the one registry of names every caller offers (``orion.runtime.get_backend``, each command's
``--backend``); it lives here, apart from the backends' code, so that naming the choices imports nothing heavy.
"""

#: Backend names and what each promises: users' first complaint about ANE tools is a silent fallback.
BACKENDS = {
    "auto": "the ANE where this machine has one, else the emulator; results name the backend that ran",
    "ane": "the Apple Neural Engine only: no ANE, or a program it refuses, is an error naming why, never a fallback",
    "emulator": "the ANE's numerics and binding rules in numpy, on any OS",
}
#: Set for a process (e.g. ``ORION_BACKEND=ane``), it decides what ``auto`` means, in the library and the CLI alike.
BACKEND_ENV = "ORION_BACKEND"


def requested_backend(name: str) -> tuple[str, str]:
    """(the backend ``name`` asks for, how an error names that request): ``auto`` is ``$ORION_BACKEND`` when set.
    An unknown name is an error naming where it came from."""
    import os

    from orion.errors import SettingsError

    asked = f"backend {name!r}"
    if name == "auto" and os.environ.get(BACKEND_ENV):
        name = os.environ[BACKEND_ENV]
        asked = f"{BACKEND_ENV}={name!r}"
    if name not in BACKENDS:
        raise SettingsError(f"unknown {asked}; choose one of {', '.join(BACKENDS)}")
    return name, asked
