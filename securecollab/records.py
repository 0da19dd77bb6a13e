"""`record`: the dataclass decorator of per-message value types (store records, backplane
deliveries): slotted, read-only to the type checker, not frozen at runtime.

Why not `frozen=True`: a frozen dataclass's __init__ sets every field through
object.__setattr__ (9 fields: ~1.4 us instead of ~0.5 us), and one chat message builds
several of these on the event loop. mypy still rejects an assignment to a field
(`dataclass_transform(frozen_default=True)`); nothing hashes them, and at runtime they
are unhashable (eq without frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

_R = TypeVar("_R")


@dataclass_transform(frozen_default=True)
def record(cls: type[_R]) -> type[_R]:
    """A slotted dataclass, read-only to the type checker (see the module docstring)."""
    return dataclass(slots=True)(cls)
