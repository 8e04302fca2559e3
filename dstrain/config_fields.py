"""Schema fields whose value is one of a few names: dstrain.checks.validate checks every such field."""

from dataclasses import field
from typing import List, Optional


def one_of(default, *names, registry: Optional[str] = None):
    """A field that must be one of `names`, or one of the names registered in `registry` ("module:ATTRIBUTE",
    imported only when validating, so that composing a config stays light)."""
    return field(default=default, metadata={"choices": names, "registry": registry})


def some_of(default: List[str], registry: str):
    """A list field whose every item is one of the names registered in `registry`."""
    return field(default_factory=lambda: list(default), metadata={"choices": (), "registry": registry})
