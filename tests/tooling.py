"""Locating tools that CI installs (.ci/run) but a developer machine may lack: node, npm packages, buf,
Go and protoc with Debian's Go packages.

A test that needs one skips when it is missing, except under CI (env CI set), where it fails:
CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = REPO_ROOT / "tests" / "node"


def missing(what: str) -> None:
    """Skip on a developer machine, fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing under CI; .ci/run installs it", pytrace=False)
    pytest.skip(f"{what} is missing (run .ci/run, or `npm ci --prefix tests/node`)")


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        missing("node")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing("tests/node/node_modules (npm ci --prefix tests/node)")
    return node


def require_buf() -> str:
    local = NODE_DIR / "node_modules" / ".bin" / "buf"
    buf = str(local) if local.exists() else shutil.which("buf")
    if buf is None:
        missing("buf (npm @bufbuild/buf in tests/node)")
    return buf


GO_DIR = REPO_ROOT / "tests" / "go"
# What tests/go/build.sh needs: Debian's packages golang-go, protobuf-compiler, protoc-gen-go,
# protoc-gen-go-grpc, and the Go libraries (golang-google-grpc-dev, golang-google-protobuf-dev,
# golang-github-golang-protobuf-1-5-dev) as source under /usr/share/gocode.
GO_TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
GO_LIBRARIES = ("google.golang.org/grpc", "google.golang.org/protobuf", "github.com/golang/protobuf",
                "google.golang.org/genproto/googleapis/rpc/errdetails")


def require_go_toolchain() -> None:
    for tool in GO_TOOLS:
        if shutil.which(tool) is None:
            missing(f"{tool} (Debian's Go packages; .ci/run installs them)")
    for library in GO_LIBRARIES:
        if not (Path("/usr/share/gocode/src") / library).is_dir():
            missing(f"/usr/share/gocode/src/{library} (Debian's Go packages; .ci/run installs them)")


CI_BIN = REPO_ROOT / ".ci" / "bin"  # where .ci/install-helm puts helm and kubectl


def require_helm() -> str:
    """helm from .ci/bin (installed by .ci/install-helm from PyPI) or PATH."""
    local = CI_BIN / "helm"
    helm = str(local) if local.exists() else shutil.which("helm")
    if helm is None:
        missing("helm (.ci/install-helm)")
    return helm


def require_promtool() -> str:
    """promtool from the Debian package prometheus (.ci/run installs it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (apt-get install prometheus)")
    return promtool
