"""Location of the pip packages whose bundled files the demo datasets are built from."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

INSTALL_HINT = 'pip install "multitune[demo]"'


def _missing_package_error(module: str, distribution: str, dataset: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"demo dataset {dataset!r} needs the package {distribution!r} (module {module!r}), "
        f"which is not installed. Install the demo extras: {INSTALL_HINT}",
        name=module,
    )


def package_directory(module: str, distribution: str, dataset: str) -> Path:
    """Return the directory of the installed package ``module`` without importing it.

    ``module`` must be a top-level package name, because ``importlib.util.find_spec`` imports the
    parents of a dotted name. Raises ``ModuleNotFoundError`` naming ``distribution`` and the install
    command when the package is missing.
    """
    if "." in module:
        raise ValueError(f"package_directory takes a top-level package name, not {module!r}")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package_error(module, distribution, dataset)
    return Path(next(iter(spec.submodule_search_locations)))


def import_package(module: str, distribution: str, dataset: str) -> ModuleType:
    """Import ``module``, or raise ``ModuleNotFoundError`` naming ``distribution`` and the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and module.split(".")[0] != error.name.split(".")[0]:
            raise  # a dependency of the package is missing, and its own message names it
        raise _missing_package_error(module, distribution, dataset) from error


def package_file(module: str, distribution: str, dataset: str, relative_path: str) -> Path:
    """Return the path of ``relative_path`` inside the installed package ``module``.

    Raises ``FileNotFoundError`` with the installed version when that version does not ship the file.
    """
    path = package_directory(module, distribution, dataset) / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"demo dataset {dataset!r}: {path} not found in {distribution} "
            f"{distribution_version(distribution)}. Reinstall the demo extras: {INSTALL_HINT}"
        )
    return path


def distribution_version(distribution: str) -> str | None:
    """Return the installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
