"""Exact MIQP solvers and relaxation bounds; each module registers its solvers."""

from . import enumerate as _enumerate  # noqa: F401
