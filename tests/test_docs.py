"""The user documentation under docs/ runs and stays complete.

A ```python block that directly follows a ``<!-- doctest -->`` line is executed. The blocks of
one page run in order in one namespace, so a block may use what an earlier block defined.
Other checks compare the pages with the code: every registered balancer, mixing strategy,
config field, task loss and CLI command is documented, the defaults in the hyper-parameter
tables equal the constructors' defaults, and links between the pages resolve.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("balancers.md", "mixing.md", "losses.md", "configuration.md", "python-api.md")

_RUNNABLE = re.compile(r"^<!-- doctest -->[ \t]*\n```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*$", re.MULTILINE)
_TABLE_ROW = re.compile(r"^\|[ \t]*`([^`]+)`[ \t]*\|[ \t]*([^|]*?)[ \t]*\|", re.MULTILINE)


def _read(page: str) -> str:
    return (DOCS_DIR / page).read_text(encoding="utf-8")


def _runnable_blocks(text: str) -> list[tuple[int, str]]:
    """Return the (first line number, source) of every runnable block of a page."""
    blocks = []
    for match in _RUNNABLE.finditer(text):
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((line, match.group(1)))
    return blocks


def _without_code(text: str) -> str:
    """Return ``text`` with the lines of fenced code blocks emptied, so a ``# comment`` there is no heading."""
    lines = text.split("\n")
    inside = False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            lines[index] = ""
    return "\n".join(lines)


def _section(text: str, heading: str, *, nested: bool = True) -> str:
    """Return the text under ``heading`` (such as ``"## `training`"``).

    The section ends at the next heading of the same or a higher level, or with
    ``nested=False`` at the next heading of any level.
    """
    hashes, _, title = heading.partition(" ")
    text = _without_code(text)
    headings = list(_HEADING.finditer(text))
    for index, match in enumerate(headings):
        if match.group(1) != hashes or match.group(2) != title:
            continue
        level = len(hashes)
        end = len(text)
        for later in headings[index + 1 :]:
            if len(later.group(1)) <= level or not nested:
                end = later.start()
                break
        return text[match.end() : end]
    raise AssertionError(f"heading {heading!r} not found")


def _table_keys(section: str) -> dict[str, str]:
    """Return the first-column keys of the section's tables, each with its second cell."""
    return {match.group(1): match.group(2) for match in _TABLE_ROW.finditer(section)}


# Runnable blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [page for page in PAGES if page != "configuration.md"])
def test_runnable_blocks_execute(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _runnable_blocks(_read(page))
    assert blocks, f"{page} has no runnable block"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    for line, source in blocks:
        # Blank lines keep the traceback's line numbers equal to the page's.
        code = compile("\n" * (line - 1) + source, str(DOCS_DIR / page), "exec")
        exec(code, namespace)


def test_runnable_marker_precedes_python_block() -> None:
    for page in PAGES:
        text = _read(page)
        markers = text.count("<!-- doctest -->")
        assert markers == len(_runnable_blocks(text)), f"{page}: a <!-- doctest --> line is not followed by a ```python block"


def test_python_api_blocks_all_runnable() -> None:
    text = _read("python-api.md")
    assert text.count("```python") == len(_runnable_blocks(text)), "python-api.md promises that every snippet runs; mark each with <!-- doctest -->"


# Balancers -------------------------------------------------------------------------------------


def _balancer_defaults(cls: type) -> dict[str, object]:
    from multitune.config import balancer_hyperparameter_names

    parameters = inspect.signature(cls.__init__).parameters
    return {name: parameters[name].default for name in balancer_hyperparameter_names(cls)}


def _plain(value: object) -> object:
    """Return ``value`` with tuples turned into lists, as YAML writes them."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def _assert_default(page: str, where: str, key: str, documented: str, default: object) -> None:
    """Check that a table's default cell, a YAML value in backticks, equals the code's default."""
    if default is inspect.Parameter.empty:
        assert documented == "required", f"{page} {where}: `{key}` has no default, documented as {documented!r}"
        return
    assert documented.startswith("`"), f"{page} {where}: default of `{key}` must be a `value` in backticks, got {documented!r}"
    assert documented.endswith("`"), f"{page} {where}: default of `{key}` must be a `value` in backticks, got {documented!r}"
    value = yaml.safe_load(documented.strip("`"))
    assert _plain(value) == _plain(default), f"{page} {where}: `{key}` documented with default {value!r}, the code has {default!r}"
    assert type(value) is type(_plain(default)), f"{page} {where}: `{key}` default {documented} reads as {type(value).__name__} in YAML"


def test_every_balancer_has_a_section() -> None:
    from multitune.balancing import available_balancers, get_balancer_class

    text = _read("balancers.md")
    for name in available_balancers():
        section = _section(text, f"### `{name}`")
        class_name = get_balancer_class(name).__name__
        assert f"`{class_name}`" in section, f"balancers.md: section `{name}` does not name the class {class_name}"


def test_balancer_hyperparameters_and_defaults_documented() -> None:
    from multitune.balancing import GradientBalancer, available_balancers, get_balancer_class

    text = _read("balancers.md")
    shared_rows = _table_keys(_section(text, "### Gradient-based balancers"))
    shared_defaults = _balancer_defaults(GradientBalancer)
    assert set(shared_rows) == set(shared_defaults), f"shared gradient options table lists {sorted(shared_rows)}"
    for key, documented in shared_rows.items():
        _assert_default("balancers.md", "shared gradient options", key, documented, shared_defaults[key])

    for name in available_balancers():
        cls = get_balancer_class(name)
        rows = _table_keys(_section(text, f"### `{name}`"))
        for key, default in _balancer_defaults(cls).items():
            if key == "on_nonfinite":
                continue  # documented once in "The balancer API"
            if issubclass(cls, GradientBalancer) and key in shared_defaults and key not in rows:
                assert default == shared_defaults[key], f"{name}: `{key}` defaults to {default!r}; document it in its section"
                continue
            assert key in rows, f"balancers.md: section `{name}` has no table row for the hyper-parameter `{key}`"
            _assert_default("balancers.md", f"section `{name}`", key, rows[key], default)


def test_balancer_glance_table_complete() -> None:
    from multitune.balancing import available_balancers

    rows = _table_keys(_section(_read("balancers.md"), "### Every balancer at a glance"))
    assert sorted(rows) == available_balancers()


# Mixing ----------------------------------------------------------------------------------------


def test_every_mixing_strategy_has_a_section() -> None:
    from multitune.data import STRATEGIES

    text = _read("mixing.md")
    for strategy in STRATEGIES:
        _section(text, f"### `{strategy}`")


def test_mixing_fields_in_mixing_page() -> None:
    from multitune.data import MixingSpec, MixingStage

    text = _read("mixing.md")
    for field in [*MixingSpec.model_fields, *MixingStage.model_fields]:
        assert re.search(rf"\b{field}\b", text), f"mixing.md does not mention the MixingSpec field `{field}`"


# Configuration ---------------------------------------------------------------------------------


def _config_sections() -> dict[str, type[BaseModel]]:
    from multitune.config import BalancerConfig, Config, ModelConfig, TrainingConfig
    from multitune.data import DatasetSource, MixingSpec, MixingStage, TaskSpec
    from multitune.models import LoraSpec

    return {
        "## Top level": Config,
        "## `model`": ModelConfig,
        "### `model.lora`": LoraSpec,
        "## `tasks`": TaskSpec,
        "### Data sources": DatasetSource,
        "## `mixing`": MixingSpec,
        "### `mixing.stages`": MixingStage,
        "## `balancer`": BalancerConfig,
        "## `training`": TrainingConfig,
    }


@pytest.mark.parametrize("heading", list(_config_sections()))
def test_config_fields_documented_with_defaults(heading: str) -> None:
    from pydantic_core import PydanticUndefined

    model = _config_sections()[heading]
    rows = _table_keys(_section(_read("configuration.md"), heading, nested=False))
    fields = model.model_fields
    assert set(rows) == set(fields), (
        f"configuration.md {heading}: missing {sorted(set(fields) - set(rows))}, unknown {sorted(set(rows) - set(fields))}"
    )
    for key, info in fields.items():
        if info.is_required():
            assert rows[key] == "required", f"configuration.md {heading}: `{key}` is required, documented default {rows[key]!r}"
            continue
        default = info.default if info.default is not PydanticUndefined else info.default_factory()  # type: ignore[misc]
        if isinstance(default, BaseModel):
            # A nested section: its own table documents its defaults.
            continue
        _assert_default("configuration.md", heading, key, rows[key], default)


def test_config_examples_validate() -> None:
    from multitune.config import config_from_dict

    text = _read("configuration.md")
    examples = re.findall(r"^<!-- config -->[ \t]*\n```yaml[ \t]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert examples, "configuration.md has no <!-- config --> example"
    for example in examples:
        config = config_from_dict(yaml.safe_load(example), base_dir=DOCS_DIR, source="configuration.md")
        assert config.tasks


def test_cli_commands_documented() -> None:
    from multitune.cli import _COMMANDS

    text = _read("configuration.md")
    for command in _COMMANDS:
        _section(text, f"### `{command}`")


# Losses ----------------------------------------------------------------------------------------


def test_task_losses_documented() -> None:
    from multitune.models._criteria import DEFAULT_LOSSES, LOSSES_BY_KIND

    rows = _table_keys(_section(_read("losses.md"), "## Losses by task kind"))
    assert set(rows) == set(LOSSES_BY_KIND)
    for kind, names in LOSSES_BY_KIND.items():
        cell = rows[kind]
        for name in names:
            assert f"`{name}`" in cell, f"losses.md: loss `{name}` of kind {kind!r} is not listed"
        assert f"`{DEFAULT_LOSSES[kind]}` (default)" in cell, f"losses.md: the default loss of {kind!r} is not marked"


# Links -----------------------------------------------------------------------------------------


def _anchor(title: str) -> str:
    """Return the anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = title.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: str) -> set[str]:
    return {_anchor(match.group(2)) for match in _HEADING.finditer(_without_code(_read(page)))}


def test_links_between_pages_resolve() -> None:
    link = re.compile(r"\]\(([^)\s]+)\)")
    for page in PAGES:
        prose = re.sub(r"`[^`\n]*`", "", _without_code(_read(page)))
        for target in link.findall(prose):
            if target.startswith(("http://", "https://")):
                continue
            file, _, fragment = target.partition("#")
            file = file or page
            path = DOCS_DIR / file
            assert path.is_file(), f"{page}: link to missing file {target!r}"
            if fragment and file.endswith(".md"):
                assert fragment in _anchors(file), f"{page}: link {target!r} names no heading of {file}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
