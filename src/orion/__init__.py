"""Orion: program Apple's Neural Engine directly, and emulate it anywhere."""

__version__ = "0.1.0"


def load(path_or_id: str, **options):
    """Load a language model (see :func:`orion.models.load`); imported lazily so ``import orion`` stays light."""
    from orion.models import load as load_model

    return load_model(path_or_id, **options)
