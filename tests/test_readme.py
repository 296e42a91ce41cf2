"""README.md as a new user reads it: two set-up commands (the ones CI runs), the CPU build of torch
at the version the project pins, and a quick test tier that pytest knows."""

from __future__ import annotations

import re
import tomllib

from tests.tooling import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def command_after(marker: str) -> str:
    return README.split(f"<!-- {marker} -->\n```bash\n", 1)[1].split("```", 1)[0].strip()


def test_exactly_two_set_up_commands():
    assert command_after("serve-command") == "pip install -e . && gptoss-cluster serve"
    assert command_after("test-command") == "pip install -e '.[test]' && python -m pytest"
    assert README.count("<!-- serve-command -->") == README.count("<!-- test-command -->") == 1
    assert README.split("## Talk to it")[0].count("```bash") == 2


def test_readme_says_how_to_get_the_cpu_build_of_the_pinned_torch():
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    advice = re.search(r"`pip install (torch==\S+) --index-url https://download\.pytorch\.org/whl/cpu`", README)
    assert advice is not None and advice.group(1) == torch_pin


def test_readme_names_the_quick_tier_by_a_registered_marker():
    tier = re.search(r'`python -m pytest -m "not (\w+)"`', README)
    markers = [m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]]
    assert tier is not None and tier.group(1) in markers
