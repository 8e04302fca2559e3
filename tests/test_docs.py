"""The schema explains itself, and the README's config table says the same as the schema and conf/."""

import ast
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from dstrain import config, data_config, eval_config, peft_config
from dstrain.checks import allowed_values
from dstrain.compose import CONF_DIR, CONFIG_GROUPS
from dstrain.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
# The field whose value names the option a group was composed from.
SELECTORS = {"model": "name", "zero": "stage", "precision": "dtype", "peft": "method", "data": "name",
             "logger": "file", "optim": "name", "scheduler": "name"}


def _dataclass_fields_and_comments():
    """(class name, field name, the comment block above it, the comment blocks above the fields before it)."""
    for module in (config, data_config, eval_config, peft_config):
        yield from _fields_and_comments_in(Path(module.__file__).read_text())


def _fields_and_comments_in(source: str):
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not isinstance(statement, ast.AnnAssign):
                continue
            above, index = [], statement.lineno - 2
            # The comment block directly above, or above the run of fields this one closes.
            while index >= 0 and (lines[index].strip().startswith("#") or _is_field(lines[index])):
                if lines[index].strip().startswith("#"):
                    above.append(lines[index].strip())
                elif above:
                    break
                index -= 1
            directly = lines[statement.lineno - 2].strip().startswith("#")
            yield node.name, statement.target.id, directly, " ".join(reversed(above))


def _is_field(line: str) -> bool:
    return bool(re.match(r"^\s+\w+: ", line))


@pytest.mark.parametrize("owner, name, directly, comment", list(_dataclass_fields_and_comments()),
                         ids=lambda value: value if isinstance(value, str) and " " not in value else "")
def test_every_schema_field_has_a_comment(owner, name, directly, comment):
    assert directly or name in comment, f"{owner}.{name} has no comment of its own, and the one above does not name it"


def _group_table():
    readme = (REPO / "README.md").read_text()
    section = readme.split("| group | options | what it sets |", 1)[1].split("\n\n", 1)[0]
    for line in section.strip().splitlines()[1:]:
        group, options, sets = [cell.strip() for cell in line.strip("|").split("|")]
        yield group.strip("`"), options, sets


def _declared(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not is_dataclass(node) or part not in {spec.name for spec in fields(node)}:
            return False
        node = getattr(node, part)
    return True


def test_the_readme_config_table_has_every_group_and_its_options():
    table = {group: (options, sets) for group, options, sets in _group_table()}
    assert set(table) == set(CONFIG_GROUPS)
    defaults = TrainConfig()
    for group, (options, _) in table.items():
        listed = re.findall(r"`([^`]+)`", options)
        assert set(listed) == {path.stem for path in (CONF_DIR / group).glob("*.yaml")}, group
        marked = re.findall(r"`([^`]+)` \(default\)", options)
        if group in SELECTORS:
            assert marked == [str(getattr(getattr(defaults, group), SELECTORS[group]))], group


def test_every_key_the_readme_config_table_names_is_in_the_schema():
    cfg = TrainConfig()
    for group, options, sets in _group_table():
        node = getattr(cfg, group)
        option_names = set(re.findall(r"`([^`]+)`", options))
        choices = {str(value) for spec in fields(node) if "choices" in spec.metadata for value in allowed_values(spec)}
        for token in re.findall(r"`([^`]+)`", sets):
            key = token.split("=", 1)[0]
            if key.startswith("+") or " " in key or key in option_names or key in choices:
                continue
            first = key.split(".", 1)[0]
            if first in CONFIG_GROUPS:
                assert _declared(cfg, key), f"README's {group} row names {token}, not in the schema"
            elif first in {spec.name for spec in fields(node)}:
                assert _declared(node, key), f"README's {group} row names {token}, not in the schema"
            else:
                assert "." in key, f"README's {group} row names `{token}`: neither a {group}.* key nor an option"


def test_the_readme_exit_codes_are_the_exit_code_enum_and_the_example_job_script_agrees():
    from dstrain.errors import ExitCode

    readme = (REPO / "README.md").read_text()
    table = readme.split("| exit code | meaning | what to do |", 1)[1].split("\n\n", 1)[0]
    codes = [int(line.split("|")[1]) for line in table.strip().splitlines()[1:]]
    assert codes == sorted(int(code) for code in ExitCode)
    example = (REPO / "launch" / "slurm" / "train.sbatch").read_text()
    assert f'if [ "$status" -eq {int(ExitCode.PREEMPTED)} ]; then' in example
