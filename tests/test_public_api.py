"""The package version and the README's list of public names."""

import importlib
import os
import re
import tomllib

from packaging.version import Version

import segjax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_pep440_and_the_project_version():
  version = Version(segjax.__version__)  # raises InvalidVersion for anything that is not PEP 440
  assert str(version) == segjax.__version__, "the version string is not in PEP 440's normal form"
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    assert tomllib.load(f)["project"]["version"] == segjax.__version__


def test_readme_public_api_names_exist():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  section = readme.split("## Public API", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| `([\w.]+)` \| (.+) \|$", section, flags=re.M)
  assert len(rows) >= 15
  for module_name, names in rows:
    module = importlib.import_module(module_name)
    # `Class` (`method`, ...): the methods are attributes of the class
    for owner, methods in re.findall(r"`(\w+)` \(([^)]*)\)", names):
      for method in re.findall(r"`(\w+)`", methods):
        assert hasattr(getattr(module, owner), method), f"README lists {module_name}.{owner}.{method}"
    for name in re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", names)):
      assert hasattr(module, name), f"README lists {module_name}.{name}, which does not exist"
