"""A registry of named components for one choice axis of the config (PEFT method, data source, evaluator,
export format). The config field that selects a component takes its allowed values from here
(config.one_of(registry=...)), so adding a component is one decorated class, and nothing compares strings."""

from typing import Callable, Dict, Generic, List, TypeVar

from dstrain.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, key: str):
        # The config key (or command option) that selects from this registry, for error messages.
        self.key = key
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(component: T) -> T:
            if name in self._entries:
                raise RuntimeError(f"{self.key}: {name!r} is registered twice")
            self._entries[name] = component
            return component

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r} is not one of {self.names()}")
        return self._entries[name]

    def names(self) -> List[str]:
        return list(self._entries)
