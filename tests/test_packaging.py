"""The package as setup.cfg builds it: every subpackage and data file is included (an
editable install hides a missing one)."""

import configparser
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_python_package_is_found():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = [p.strip() for p in cfg["options.packages.find"]["include"].split(",")]
    found = set(find_packages(where=str(ROOT), include=include))
    dirs = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "fedasr").rglob("*.py")}
    assert dirs - found == set(), "directories with modules that setup.cfg would not package"
