"""Which xmorpher_kernels the benchmarks measure (benchmarks/conftest.py), on fake trees: an
uncompiled source tree on sys.path gives way to an installed copy, an in-place build is used when
nothing is installed, neither stops the session; and a built backend that cannot load stops it."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

import conftest


def _package(parent, built: bool = False):
    package = parent / "xmorpher_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if built:
        (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF libc10.so libc10_cuda.so")
    return package


@pytest.fixture
def trees(tmp_path, monkeypatch):
    """A source tree (the fake ROOT) and a site-packages folder, with no xmorpher_kernels imported."""
    root, site = tmp_path / "clone", tmp_path / "site"
    root.mkdir()
    site.mkdir()
    monkeypatch.setattr(conftest, "ROOT", str(root))
    monkeypatch.delitem(sys.modules, "xmorpher_kernels", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # nothing on the path may provide the real package (the clone's root, site-packages, the cwd)
    sys.path[:] = [entry for entry in sys.path
                   if entry not in ("", ".") and not os.path.exists(os.path.join(entry, "xmorpher_kernels"))]
    return root, site


def test_uncompiled_source_tree_gives_way_to_the_installed_copy(trees):
    root, site = trees
    _package(root)
    installed = _package(site)
    sys.path[:0] = [str(root), str(site)]  # as `python -m pytest` from the clone's root
    note = conftest.choose_package_copy()
    assert str(root) not in sys.path and str(site) in sys.path
    assert f"installed copy {installed}" in note and "taken off sys.path" in note


def test_in_place_build_is_used_when_nothing_is_installed(trees):
    root, _ = trees
    _package(root, built=True)
    note = conftest.choose_package_copy()  # as `pytest benchmarks/`: the root is not on sys.path
    assert sys.path[0] == str(root) and "in-place build" in note


def test_installed_copy_is_named_when_both_exist(trees):
    root, site = trees
    _package(root, built=True)
    installed = _package(site)
    sys.path.insert(0, str(site))
    note = conftest.choose_package_copy()
    assert str(root) not in sys.path and f"installed copy {installed}" in note and "not what is measured" in note


def test_nothing_to_measure_stops_the_session(trees):
    root, _ = trees
    _package(root)
    sys.path.insert(0, str(root))
    with pytest.raises(pytest.UsageError, match="pip install"):
        conftest.choose_package_copy()


def test_a_built_backend_that_cannot_load_is_an_error(tmp_path):
    package = _package(tmp_path, built=True)

    def status(available, reason=None):
        return SimpleNamespace(available=available, reason=reason)

    fine = {"cpu": status(True), "cuda": status(True), "triton": status(True)}
    assert conftest.built_backend_problems(fine, str(package), gpu=True, triton_installed=True) == []
    broken = {"cpu": status(False, "undefined symbol"), "cuda": status(False, "undefined symbol"), "triton": status(False, "old")}
    problems = conftest.built_backend_problems(broken, str(package), gpu=True, triton_installed=True)
    assert len(problems) == 3 and all("cannot load" in p for p in problems)
    assert ["backend cpu" in problems[0], "backend cuda" in problems[1], "backend triton" in problems[2]] == [True] * 3
    assert len(conftest.built_backend_problems(broken, str(package), gpu=False, triton_installed=True)) == 2  # Triton matters on GPUs
    (package / "_C.cpython-311-x86_64-linux-gnu.so").unlink()
    assert "extension is missing" in conftest.built_backend_problems(fine, str(package), gpu=False, triton_installed=False)[0]
