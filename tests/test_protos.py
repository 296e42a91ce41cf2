"""The committed generated code (gptoss/) must be exactly what protoc makes of protos/ today."""

from __future__ import annotations

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
        "Generate", "Chat", "GetModelInfo"}
    assert hasattr(inference_pb2_grpc, "InferenceStub")


def test_every_enum_starts_with_unspecified_and_every_field_is_documented():
    text = (protogen.PROTO_ROOT / "gptoss/v1/inference.proto").read_text().splitlines()
    from gptoss.v1 import inference_pb2

    for enum in inference_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
    # Each field or enum value line is directly preceded by a comment line.
    for i, line in enumerate(text):
        stripped = line.strip()
        is_member = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "option"))
        if is_member:
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
