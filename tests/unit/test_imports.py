"""Importing low-level modules has no side effects: transformers is imported only by what needs it, and
``import autoround`` still registers the transformers integration, before or after transformers is imported."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("module", ["autoround.quantizer.qmath", "autoround.backends", "autoround.quantizer.options",
                                    "autoround.quantizer.dtypes", "autoround.envs"])
def test_low_level_modules_do_not_import_transformers(module):
    assert _run(f"import sys, {module}; print('transformers' in sys.modules)") == "False"


@pytest.mark.parametrize("order", ["import autoround, transformers", "import transformers, autoround",
                                   "import autoround.quantizer.qmath; from transformers import AutoModelForCausalLM"])
def test_transformers_integration_is_registered_in_any_import_order(order):
    out = _run(f"{order}\nfrom transformers.quantizers import auto\n"
               "print(auto.AUTO_QUANTIZER_MAPPING['auto-round'].__module__)")
    assert out == "autoround.transformers_integration"


def test_public_names_resolve():
    assert _run("import autoround; print(autoround.AutoRound.__name__, autoround.AutoRoundConfig.__name__)") == \
        "AutoRound AutoRoundConfig"


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists the packages explicitly (the import root maps folders): a new subpackage missing from that
    list imports here (editable install) but not from the wheel the engines' virtualenvs install."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: root / folder for name, folder in tool["package-dir"].items()}
    listed = set(tool["packages"])
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)) if rel else name)
    missing = found - listed
    assert not missing, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(missing)}"
