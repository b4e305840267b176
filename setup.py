"""Package discovery under the one import root ``defocus_scale``.

``kernels/`` and ``orchestration/`` live at the repository root (the design fixes the layout) but
install as ``defocus_scale.kernels`` and ``defocus_scale.orchestration``. setuptools' automatic
discovery would install them as top-level ``kernels``/``orchestration``, so the package list is
built here from the directory tree and mapped through ``package_dir``.
"""

import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
# The mapping itself lives in pyproject.toml ([tool.setuptools.package-dir]); only the list of
# packages, which follows from it and the tree, is computed here.
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]


def _packages() -> list[str]:
    found = []
    for name, rel in PACKAGE_DIRS.items():
        base = ROOT / rel
        for init in sorted(base.rglob("__init__.py")):
            parts = init.parent.relative_to(base).parts
            if "__pycache__" in parts:
                continue
            found.append(".".join((name, *parts)))
    return found


setup(packages=_packages())
