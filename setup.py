"""Build hook: ship the top-level `mappings/` (the single source in the repository) inside
the wheel as `omgtool/mappings/`. Everything else is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_mappings(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the repository's mappings/ directly
        target = Path(self.build_lib) / "omgtool" / "mappings"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "mappings", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": build_py_with_mappings})
