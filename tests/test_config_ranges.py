"""Every numeric field of the schema declares its range, and a value outside it, or of the wrong type, is refused
before any process group starts: in-process through compose and validate for every field, and through the real
entry points (launch/train.py, dstrain prepare, dstrain submit) for exit code 2 and the one line."""

import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dstrain.checks import validate
from dstrain.compose import compose
from dstrain.config import TrainConfig
from dstrain.config_fields import Range, declared_fields, in_range, range_table
from dstrain.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parent.parent
NUMBERS = (int, float)


def numeric_type(annotation):
    """int or float for a field annotated int, float, Optional[...] or List[...] of them; None otherwise."""
    arguments = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, list) and len(arguments) == 1:
        annotation = arguments[0]
    return annotation if annotation in NUMBERS else None


def numeric_fields(schema=TrainConfig):
    """(dotted key, field, value) of every numeric field, found from the type annotations."""
    return [(key, spec, value) for key, spec, value in declared_fields(schema()) if numeric_type(spec.type)]


def undeclared(schema=TrainConfig):
    return [key for key, spec, _ in numeric_fields(schema) if not {"range", "choices"} & set(spec.metadata)]


def outside(bounds: Range, kind):
    """A value of type `kind` just outside the range."""
    if bounds.above is not None:
        return kind(bounds.above)
    if bounds.at_least is not None:
        return kind(bounds.at_least - 1)
    if bounds.below is not None:
        return kind(bounds.below)
    return kind(bounds.at_most + 1)


def as_override(key: str, value, is_list: bool) -> str:
    return f"{key}=[{value}]" if is_list else f"{key}={value}"


RANGED = [(key, spec, value) for key, spec, value in numeric_fields() if "range" in spec.metadata]
CHOSEN = [(key, spec, value) for key, spec, value in numeric_fields() if "choices" in spec.metadata]


# ------------------------------------------------------------------------------ the schema, walked


@pytest.mark.parametrize("key", [key for key, _, _ in numeric_fields()])
def test_every_numeric_field_declares_its_range(key):
    assert key not in undeclared(), f"{key} is numeric but declares no range: give it in_range(default, ...)"


def test_a_numeric_field_without_a_range_is_found():
    @dataclass
    class Section:
        declared: float = in_range(1.0, above=0)
        forgotten: typing.Optional[int] = None
        items: typing.List[float] = in_range([], at_least=0)
        flag: bool = False
        name: str = "x"

    @dataclass
    class Schema:
        section: Section = field(default_factory=Section)

    assert undeclared(Schema) == ["section.forgotten"]


@pytest.mark.parametrize("key, spec, default", RANGED, ids=[key for key, _, _ in RANGED])
def test_a_value_outside_the_range_is_refused_naming_the_key(key, spec, default):
    bounds = spec.metadata["range"]
    value = outside(bounds, numeric_type(spec.type))
    with pytest.raises(ConfigError) as error:
        validate(compose([as_override(key, value, isinstance(default, list))]))
    assert f"{key}=" in str(error.value) and f"must be {bounds}" in str(error.value)


@pytest.mark.parametrize("key, spec, default", CHOSEN, ids=[key for key, _, _ in CHOSEN])
def test_a_number_that_is_not_one_of_the_choices_is_refused_naming_the_key(key, spec, default):
    with pytest.raises(ConfigError, match=rf"^{key}=99 is not one of"):
        validate(compose([f"{key}=99"]))


@pytest.mark.parametrize("key, spec, default", RANGED + CHOSEN, ids=[key for key, _, _ in RANGED + CHOSEN])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(key, spec, default):
    with pytest.raises(ConfigError, match=rf"^Error merging override {key}=.*could not be converted to"):
        compose([as_override(key, "abc", isinstance(default, list))])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused(value):
    with pytest.raises(ConfigError, match=rf"^optim\.lr={value} must be a finite number above 0$"):
        validate(compose([f"optim.lr={value}"]))


def test_a_list_names_the_item_outside_the_range():
    with pytest.raises(ConfigError, match=r"^data\.split=\[0\.9, 1\.5\]: 1\.5 must be in \[0, 1\]$"):
        validate(compose(["+data=alpaca", "data.train_files=[/data/a.json]", "data.split=[0.9,1.5]"]))


def test_an_optional_field_may_be_unset_or_in_range():
    validate(compose(["launcher.cpus_per_task=null"]))
    validate(compose(["launcher.cpus_per_task=4"]))
    with pytest.raises(ConfigError, match=r"^launcher\.cpus_per_task=0 must be at least 1$"):
        validate(compose(["launcher.cpus_per_task=0"]))


def test_the_readme_table_of_ranges_is_the_schema():
    readme = (REPO / "README.md").read_text()
    table = range_table(TrainConfig)
    assert table in readme, (
        "README.md's table of allowed values differs from the schema; paste the output of\n"
        "python -c 'from dstrain.config import TrainConfig; from dstrain.config_fields import range_table; "
        "print(range_table(TrainConfig))'"
    )


# ---------------------------------------------------------------------- the entry points, for real


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Set by hand, HYDRA_FULL_ERROR asks for Hydra's traceback instead of the one line.
    env = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def the_one_line(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == ExitCode.CONFIG, completed.stdout + completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dstrain: config error: "), completed.stderr
    return lines[0]


def test_train_refuses_an_out_of_range_value_in_seconds_before_any_process_group(tmp_path):
    start = time.monotonic()
    completed = run(str(REPO / "launch" / "train.py"), "optim.lr=-1", f"run.root={tmp_path}", cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert the_one_line(completed) == "dstrain: config error: optim.lr=-1.0 must be above 0"
    # setup_logging, right after the process group starts, writes train.log.
    assert not list(tmp_path.rglob("train.log")) and not list(tmp_path.rglob("checkpoints"))
    assert elapsed < 60, f"took {elapsed:.0f}s: the check should come before any model is built"


@pytest.mark.parametrize(
    "args, names",
    [
        (["model.bogus=1"], ["model.bogus", "Key 'bogus' not in 'ModelConfig'"]),
        (["+zero=5"], ["Could not find 'zero/5'", "Available options in 'zero': 0 1 2 2_offload 3 3_offload"]),
        (["optim.lr=[1,"], ["optim.lr=[1,: "]),
        (["trainer.max_steps=1.5"], ["trainer.max_steps=1.5", "could not be converted to Integer"]),
        (["-m", "optim.lr=1e-3,abc"], ["optim.lr=abc", "could not be converted to Float"]),
        (["-m", "optim.lr=1e-3,-1"], ["optim.lr=-1.0 must be above 0"]),
    ],
    ids=["unknown key", "unknown group option", "override syntax", "wrong type", "sweep type", "sweep range"],
)
def test_train_refuses_a_composition_error_with_exit_2_and_one_line(tmp_path, args, names):
    completed = run(str(REPO / "launch" / "train.py"), *args, f"run.root={tmp_path}", cwd=tmp_path)
    line = the_one_line(completed)
    assert all(name in line for name in names), line
    # Every job of a sweep is checked before the first one starts.
    assert not [path for path in tmp_path.iterdir() if path.is_dir()], "no job's directory before the error"


@pytest.mark.parametrize("command", [["prepare"], ["submit", "--dry-run"]])
def test_the_commands_that_compose_refuse_an_out_of_range_value_with_exit_2(tmp_path, command):
    completed = run("-m", "dstrain", *command, "optim.lr=-1", f"run.root={tmp_path}", cwd=REPO)
    assert the_one_line(completed) == "dstrain: config error: optim.lr=-1.0 must be above 0"
