"""Orion: program Apple's Neural Engine directly, and emulate it anywhere."""

__version__ = "0.1.0"
