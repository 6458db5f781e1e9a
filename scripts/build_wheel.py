"""Build the wheel against the torch of this environment, and fail on deprecation warnings about
our own packaging configuration.

    python scripts/build_wheel.py OUT_DIR [PROJECT_DIR]   # PROJECT_DIR: this repository by default

Runs the build backend of pyproject.toml (setuptools) in this process, as
`pip wheel --no-build-isolation` would, and prints every warning it raises. A deprecation warning
(DeprecationWarning, FutureWarning, setuptools' deprecations, ...) is ours when it points at our
tree or is raised while setuptools reads our pyproject.toml / setup.py: the first frame of its
stack outside setuptools' own code is not another installed package. Those fail the build, so a
configuration that a future setuptools will refuse (e.g. the table form of `project.license`,
refused from 2027-02-18) is fixed while it is a warning. Warnings raised by other packages' code,
torch's C++ extension helpers included, are printed and left alone.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _within(path: str, folders: list) -> bool:
    path = os.path.abspath(path)
    return any(path == folder or path.startswith(folder + os.sep) for folder in folders)


def _is_deprecation(category: type) -> bool:
    return issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or "Deprecat" in category.__name__


def main(out_dir: str, project: str = ROOT) -> int:
    out_dir, project = os.path.abspath(out_dir), os.path.abspath(project)
    os.chdir(project)
    import setuptools
    from setuptools import build_meta as backend  # the build-backend of pyproject.toml

    # Code that raises warnings on behalf of its caller: skipped when looking for who caused one.
    setuptools_dir = os.path.dirname(os.path.abspath(setuptools.__file__))
    site = os.path.dirname(setuptools_dir)
    machinery = [setuptools_dir, os.path.join(site, "_distutils_hack"), os.path.join(site, "pkg_resources"),
                 os.path.abspath(warnings.__file__)]
    installed = sorted({os.path.abspath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})
    ours: list = []

    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        print(text, file=sys.stderr, flush=True)
        if not _is_deprecation(category):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not _within(f.filename, machinery) and not f.filename.startswith("<frozen")]
        culprit = frames[-1].filename if frames else ""  # exec'd setup.py shows as "<string>"
        if (_within(filename, [project]) and not _within(filename, installed)) or not _within(culprit, installed):
            ours.append(text)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        os.makedirs(out_dir, exist_ok=True)
        name = backend.build_wheel(out_dir)
    if ours:
        print(f"\nbuild_wheel: {len(ours)} deprecation warning(s) about this project's packaging; fix them:", file=sys.stderr)
        for text in ours:
            print("  " + text.splitlines()[0], file=sys.stderr)
        return 1
    print(os.path.join(out_dir, name))
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(*sys.argv[1:]))
