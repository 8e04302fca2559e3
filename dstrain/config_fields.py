"""Schema fields that declare what values they take, next to the field: a few names (`one_of`, `some_of`) or a
numeric range (`in_range`). dstrain.checks.validate checks every such field, and the README's table of ranges
is rendered from the same declarations (`range_table`), so the check and the documentation cannot disagree."""

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import List, Optional

from dstrain.errors import ConfigError


def one_of(default, *names, registry: Optional[str] = None):
    """A field that must be one of `names`, or one of the names registered in `registry` ("module:ATTRIBUTE",
    imported only when validating, so that composing a config stays light)."""
    return field(default=default, metadata={"choices": names, "registry": registry})


def some_of(default: List[str], registry: str):
    """A list field whose every item is one of the names registered in `registry`."""
    return field(default_factory=lambda: list(default), metadata={"choices": (), "registry": registry})


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field: `above`/`below` exclude the bound, `at_least`/`at_most` include it."""

    above: Optional[float] = None
    at_least: Optional[float] = None
    below: Optional[float] = None
    at_most: Optional[float] = None

    def contains(self, value) -> bool:
        # Written so that NaN fails every bound; inf is refused too, as no setting here means "infinite".
        return (
            isinstance(value, (int, float))
            and math.isfinite(value)
            and (self.above is None or value > self.above)
            and (self.at_least is None or value >= self.at_least)
            and (self.below is None or value < self.below)
            and (self.at_most is None or value <= self.at_most)
        )

    def __str__(self) -> str:
        low = (self.above, "(") if self.above is not None else (self.at_least, "[")
        high = (self.below, ")") if self.below is not None else (self.at_most, "]")
        if low[0] is not None and high[0] is not None:
            return f"in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
        if low[0] is not None:
            return f"{'above' if self.above is not None else 'at least'} {_number(low[0])}"
        return f"{'below' if self.below is not None else 'at most'} {_number(high[0])}"


def _number(bound) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def in_range(default, *, above=None, at_least=None, below=None, at_most=None):
    """A numeric field (or a list of numbers, each item checked) that must lie in the range; an Optional field
    may also be None."""
    bounds = Range(above=above, at_least=at_least, below=below, at_most=at_most)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": bounds})
    return field(default=default, metadata={"range": bounds})


def declared_fields(node, prefix: str = ""):
    """(dotted key, dataclass field, value) for every leaf field of the schema node and the dataclasses below it."""
    for spec in fields(node):
        value = getattr(node, spec.name)
        if is_dataclass(value):
            yield from declared_fields(value, f"{prefix}{spec.name}.")
        else:
            yield f"{prefix}{spec.name}", spec, value


def check_ranges(node, prefix: str = "") -> None:
    """Every field declared with in_range holds a finite number in its range (each item, for a list), in node
    and the dataclasses below it; None passes, as OmegaConf lets only Optional fields hold it."""
    for key, spec, value in declared_fields(node, prefix):
        bounds = spec.metadata.get("range")
        if bounds is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not bounds.contains(item):
                where = f"{key}={list(value)}: {item!r}" if isinstance(value, (list, tuple)) else f"{key}={item!r}"
                finite = "a finite number " if isinstance(item, float) and not math.isfinite(item) else ""
                raise ConfigError(f"{where} must be {finite}{bounds}")


def range_table(schema) -> str:
    """The README's table of numeric ranges, one row per schema section, rendered from the declarations."""
    rows = {}
    for key, spec, value in declared_fields(schema()):
        if "range" in spec.metadata:
            section, name = key.rsplit(".", 1)
            each = "each " if isinstance(value, list) else ""
            rows.setdefault(section, []).append(f"`{name}` {each}{spec.metadata['range']}")
    lines = ["| section | allowed values |", "|---|---|"]
    lines += [f"| `{section}` | {', '.join(items)} |" for section, items in rows.items()]
    return "\n".join(lines)
