"""The committed generated code (gptoss/) must be exactly what protoc makes of protos/ today."""

from __future__ import annotations

import shutil
import subprocess

from cluster import protogen


def test_generated_code_matches_the_protos(tmp_path):
    fresh = protogen.generate(tmp_path)
    assert fresh, "no protos found"
    stale = []
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = protogen.REPO_ROOT / relative
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(relative))
    assert not stale, f"generated code is out of date: {stale}; run `python -m cluster.protogen`"


def test_generated_package_mirrors_the_proto_package():
    from gptoss.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "gptoss.v1"
    assert set(inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name) == {
        "Chat", "Generate", "Tokenize", "Detokenize", "GetModelInfo", "GetLoads"}
    assert hasattr(inference_pb2_grpc, "InferenceStub")


def test_every_enum_starts_with_unspecified_and_every_field_is_documented():
    from gptoss.v1 import inference_pb2

    for enum in inference_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
    # Each field or enum value line is directly preceded by a comment line.
    for proto in protogen.proto_files():
        text = (protogen.PROTO_ROOT / proto).read_text().splitlines()
        for i, line in enumerate(text):
            stripped = line.strip()
            is_member = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "option"))
            if is_member:
                assert text[i - 1].strip().startswith("//"), f"{proto} line {i + 1} has no comment: {stripped}"


def test_every_proto_names_where_each_language_puts_its_code():
    """protoc --go_out/--java_out/--csharp_out... work without per-file mapping flags (issue 16)."""
    from gptoss.v1 import admin_pb2, inference_pb2

    for module in (inference_pb2, admin_pb2):
        options = module.DESCRIPTOR.GetOptions()
        assert options.go_package == "github.com/gptoss-cluster/gptoss-cluster/gen/go/gptoss/v1;gptossv1"
        assert options.java_package == "com.gptoss.v1" and options.java_multiple_files
        assert options.csharp_namespace == "Gptoss.V1"
        assert (options.php_namespace, options.ruby_package, options.objc_class_prefix) == (
            "Gptoss\\V1", "Gptoss::V1", "GXX")


# ── buf: lint, and no breaking change against the committed v1 image (the compatibility baseline) ──

BUF_IMAGE = protogen.PROTO_ROOT / "buf-image-v1.binpb"


def _buf(*args: str, cwd=protogen.PROTO_ROOT) -> subprocess.CompletedProcess:
    from tests.tooling import require_buf

    return subprocess.run([require_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_passes():
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_committed_v1_image():
    result = _buf("breaking", "--against", str(BUF_IMAGE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(tmp_path):
    """The check above can fail: renumbering a field of a copy of the protos is reported."""
    copy = tmp_path / "protos"
    shutil.copytree(protogen.PROTO_ROOT, copy)
    proto = copy / "gptoss" / "v1" / "inference.proto"
    text = proto.read_text()
    assert "  optional float temperature = 2;" in text
    proto.write_text(text.replace("  optional float temperature = 2;", "  optional float temperature = 16;"))
    result = _buf("breaking", "--against", str(BUF_IMAGE), cwd=copy)
    assert result.returncode != 0
    assert "temperature" in result.stdout + result.stderr


def test_buf_breaking_catches_a_changed_go_package(tmp_path):
    """The baseline records the language options: moving the Go package breaks Go clients."""
    copy = tmp_path / "protos"
    shutil.copytree(protogen.PROTO_ROOT, copy)
    proto = copy / "gptoss" / "v1" / "admin.proto"
    proto.write_text(proto.read_text().replace("gen/go/gptoss/v1;gptossv1", "gen/go/gptoss;gptoss"))
    result = _buf("breaking", "--against", str(BUF_IMAGE), cwd=copy)
    assert result.returncode != 0
    assert "go_package" in result.stdout + result.stderr
