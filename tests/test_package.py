"""Packaging: what importing the packages loads, the message for a missing package of the
registration extra, and CI's wheel build failing on deprecated packaging configuration.

Each check runs in a fresh interpreter, since this one has imported everything already. torch
itself loads ``torch.distributed`` and ``torch.utils.data.dataloader`` on ``import torch`` (2.14),
so those cannot tell anything; what is ours to control is which of our modules, which extra
packages and which further torch modules ``import xmorpher`` adds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

import xmorpher

# The very packages these tests imported (installed, or the source tree on PYTHONPATH), run away
# from the source tree, which would otherwise shadow them.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(xmorpher.__file__)))
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _registration_extra() -> tuple:
    """The packages of the registration extra, from pyproject.toml (their names are the import names)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPOSITORY, "pyproject.toml"), "rb") as handle:
        extra = tomllib.load(handle)["project"]["optional-dependencies"]["registration"]
    return tuple(re.split(r"[\s;<>=!~\[]", requirement)[0] for requirement in extra)


REGISTRATION_PACKAGES = _registration_extra()


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())


def modules_added_by(statement: str, after: str = "import torch, xmorpher_kernels") -> list:
    """Names of the modules that `statement` adds to sys.modules, run after `after`."""
    result = run_python(
        f"import json, sys\n{after}\nbefore = set(sys.modules)\n{statement}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_import_xmorpher_loads_the_models_only():
    added = modules_added_by("import xmorpher")
    ours = {name for name in added if name.startswith("xmorpher.")}
    assert {"xmorpher.model", "xmorpher.framework", "xmorpher.factory"} <= ours  # the check sees our modules
    heavy = {"xmorpher.train", "xmorpher.evaluate", "xmorpher.cli", "xmorpher.registration", "xmorpher.runtime",
             "xmorpher.config", "xmorpher.checkpoint", "xmorpher.data"}
    assert not ours & heavy, f"import xmorpher loaded {sorted(ours & heavy)}"
    assert not [name for name in added if name.startswith("torch")], "import xmorpher loaded torch modules the op does not"
    extras = {name.split(".")[0] for name in added} & set(REGISTRATION_PACKAGES)
    assert extras == {"scipy"}, f"import xmorpher loaded {sorted(extras)}; only the metrics' scipy is needed"


def test_registration_and_config_load_on_first_use():
    added = modules_added_by("xmorpher.register, xmorpher.Config", after="import torch, xmorpher")
    assert {"xmorpher.registration", "xmorpher.config", "xmorpher.data"} <= set(added)
    assert "xmorpher.train" not in added, "registration should take its device helpers from xmorpher.runtime"
    result = run_python("import xmorpher; xmorpher.no_such_name")
    assert "AttributeError: module 'xmorpher' has no attribute 'no_such_name'" in result.stderr


def test_import_xmorpher_kernels_loads_no_registration_package():
    added = modules_added_by("import xmorpher_kernels", after="import torch")
    loaded = {name.split(".")[0] for name in added} & set(REGISTRATION_PACKAGES)
    assert not loaded, f"import xmorpher_kernels loaded {sorted(loaded)}"


def test_missing_registration_package_names_the_extra():
    # None in sys.modules makes `import scipy` raise ModuleNotFoundError, as if it were not installed
    result = run_python("import sys\nsys.modules['scipy'] = None\nimport xmorpher")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ModuleNotFoundError: xmorpher needs 'scipy'"), result.stderr[-2000:]
    assert "pip install 'xmorpher-kernels[registration]'" in last_line


BUILD_WHEEL = os.path.join(REPOSITORY, "scripts", "build_wheel.py")


@pytest.mark.skipif(not os.path.isfile(BUILD_WHEEL), reason="needs the source tree's scripts/build_wheel.py")
@pytest.mark.parametrize("license", ['{ text = "MIT" }', '"MIT"'])
def test_build_fails_on_deprecated_packaging_configuration(license, tmp_path):
    """CI's wheel build (scripts/build_wheel.py) on a small project: the table form of
    project.license, which setuptools refuses from 2027-02-18, fails it; the SPDX string passes."""
    project = tmp_path / "project"
    (project / "package").mkdir(parents=True)
    (project / "package" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "package"\nversion = "0.1"\nlicense = {license}\n[tool.setuptools]\npackages = ["package"]\n'
    )
    result = subprocess.run([sys.executable, BUILD_WHEEL, str(tmp_path / "wheels"), str(project)],
                            capture_output=True, text=True, cwd=tempfile.gettempdir())
    if license.startswith("{"):
        assert result.returncode == 1, result.stderr[-2000:]
        assert "1 deprecation warning(s) about this project's packaging" in result.stderr
        assert "`project.license` as a TOML table is deprecated" in result.stderr.splitlines()[-1]
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert os.path.isfile(result.stdout.strip().splitlines()[-1])
