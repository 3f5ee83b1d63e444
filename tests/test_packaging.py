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


def test_the_recipes_ship_as_package_data():
    """recipes/ is the top-level directory; fedasr/recipes links to it and setup.cfg's
    package_data globs take every recipe (a `pip install .` user has them all)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    link = ROOT / "fedasr" / "recipes"
    assert link.is_symlink() and link.resolve() == (ROOT / "recipes").resolve()
    globs = [g.strip() for g in cfg["options.package_data"]["fedasr"].split(",")]
    shipped = {p for g in globs for p in (ROOT / "fedasr").glob(g)}
    recipes = {link / p.relative_to(ROOT / "recipes") for p in (ROOT / "recipes").rglob("*.yaml")}
    assert recipes and recipes == shipped
