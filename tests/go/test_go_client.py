"""A Go client (tests/go/client, built by tests/go/build.sh from Debian's Go packages only) against
the live test cluster."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.tooling import GO_DIR, REPO_ROOT, require_go_toolchain


@pytest.fixture(scope="module")
def go_client(tmp_path_factory) -> str:
    require_go_toolchain()
    work = tmp_path_factory.mktemp("go")
    build = subprocess.run(["sh", str(GO_DIR / "build.sh"), str(work)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return str(work / "bin" / "gptoss-client")


@pytest.mark.slow
def test_go_client_chats_cancels_and_reads_field_violations(go_client, frontdoor):
    result = subprocess.run([go_client, frontdoor.target], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    chat = report["chat"]
    assert chat["request_id"] == "go-chat-1"
    assert chat["deltas"] >= 1 and chat["text"].strip()
    # Random weights never speak harmony: every delta is raw, with no channel claimed.
    assert chat["channels"] == ["CHANNEL_UNSPECIFIED"] and chat["raw"] == chat["deltas"]
    assert chat["finish_reason"] == "FINISH_REASON_LENGTH"
    assert chat["completion_tokens"] == 16 and chat["prompt_tokens"] > 10

    assert report["cancel"]["code"] == "Canceled" and report["cancel"]["chunks"] >= 2

    invalid = report["invalid"]
    assert invalid["code"] == "InvalidArgument"
    assert [v["field"] for v in invalid["violations"]] == ["prompt_token_ids"]
    assert invalid["violations"][0]["description"]


def test_docs_show_the_go_client_that_ci_builds():
    """docs/api.md's Go section quotes the tested client line for line and installs what .ci/run installs."""
    docs = (REPO_ROOT / "docs" / "api.md").read_text().split("## Go (tested: tests/go/client/main.go)")[1]
    go_snippet = docs.split("```go\n")[1].split("```")[0]
    client_lines = {line.strip() for line in (GO_DIR / "client" / "main.go").read_text().splitlines()}
    quoted = [line.strip() for line in go_snippet.splitlines() if line.strip() and not line.strip().startswith("// ...")]
    assert len(quoted) > 20 and [line for line in quoted if line not in client_lines] == []

    install = docs.split("```bash\n")[1].split("```")[0]
    assert "sh tests/go/build.sh" in install
    ci_loop = (REPO_ROOT / ".ci" / "run").read_text().split("for package in ")[1].split("; do")[0]
    assert debian_packages(install.split("apt-get install")[1]) == debian_packages(ci_loop)


def debian_packages(text: str) -> set[str]:
    return set(re.findall(r"\b(?:golang|protoc|protobuf)[a-z0-9.-]*", text))
