import subprocess
import sys


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "cluster", "--help"], capture_output=True, text=True, check=True)
    assert "usage: gptoss-cluster" in out.stdout
