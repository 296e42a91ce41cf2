"""Front doors with auth, tenant limits, TLS/mTLS, and a drain, each over the session's Serve app."""

from __future__ import annotations

import datetime
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cluster.config import load_config
from cluster.frontdoor.auth import ApiKeys
from cluster.metrics import FrontdoorMetrics
from gptoss.v1 import admin_pb2, admin_pb2_grpc
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import BackgroundFrontdoor
from tests.frontdoor.status_details import details, retry_delay_s

pytestmark = pytest.mark.slow

KEYS = {"acme": "acme-key-0123456789abcdef", "globex": "globex-key-0123456789abcd", "ops": "ops-key-0123456789abcdefg"}


def _door(ray_serving, tmp_path=None, **overrides):
    config = load_config(env={}, overrides={"frontdoor.grpc_port": 0, "frontdoor.http_port": -1, "frontdoor.metrics_port": -1,
                                            "frontdoor.grace_period_s": 5.0, **overrides})
    keys = ApiKeys(list(KEYS.items()), admin_tenants=["ops"])
    return BackgroundFrontdoor(ray_serving.handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()),
                               api_keys=keys)


def _bearer(tenant):
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def _generate(stub, max_tokens, metadata):
    return list(stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_stop=True)), timeout=60, metadata=metadata))


@pytest.fixture(scope="module")
def limited_door(ray_serving):
    door = _door(ray_serving, **{"frontdoor.limits.tokens_per_s": 1.0, "frontdoor.limits.token_burst": 40.0})
    yield door
    door.close()


def _error(call):
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, (pb.GetModelInfoResponse, admin_pb2.DrainResponse)):
            list(result)
    return info.value


def test_missing_and_wrong_keys_are_unauthenticated_alike(limited_door):
    with grpc.insecure_channel(limited_door.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        missing = _error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(missing)["ErrorInfo"].reason == "API_KEY_MISSING"
        answers = set()
        for key in (KEYS["acme"][:-1] + "X", "no-such-key-anywhere-at-all", KEYS["acme"] + "1", "Basic abc"):
            metadata = (("authorization", key if key.startswith("Basic") else f"Bearer {key}"),)
            err = _error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata))
            found = details(err)
            answers.add((err.code(), err.details(), found["ErrorInfo"].reason, found["ErrorInfo"].domain))
        # A near miss of a real key and a stranger's key get the very same answer.
        assert answers == {(grpc.StatusCode.UNAUTHENTICATED, "invalid API key", "API_KEY_INVALID", "gptoss.v1")}
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=_bearer("acme")).engine == "torch"


def test_keys_never_reach_the_log(limited_door, caplog):
    with caplog.at_level("DEBUG"), grpc.insecure_channel(limited_door.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        _error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                         metadata=(("authorization", "Bearer secret-guess-0123456789"),)))
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=_bearer("acme"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "secret-guess" not in text and KEYS["acme"] not in text


def test_tenant_over_its_token_budget_is_refused_while_another_is_served(limited_door):
    with grpc.insecure_channel(limited_door.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        _generate(stub, 60, _bearer("acme"))  # 3 + 60 tokens against a burst of 40: acme is in debt
        err = _error(lambda: _generate(stub, 4, _bearer("acme")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        found = details(err)
        assert found["ErrorInfo"].reason == "TENANT_RATE_LIMITED"
        assert found["QuotaFailure"].violations[0].subject == "tenant:acme/tokens"
        assert 10 < retry_delay_s(err) < 60  # about 23 tokens of debt at 1 token/s
        assert _generate(stub, 4, _bearer("globex"))[-1].complete.usage.completion_tokens == 4


def test_only_admin_tenants_may_drain(limited_door):
    with grpc.insecure_channel(limited_door.target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        err = _error(lambda: admin.Drain(admin_pb2.DrainRequest(timeout_s=1), timeout=10, metadata=_bearer("globex")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(err)["ErrorInfo"].reason == "ADMIN_REQUIRED"
    assert not limited_door.server.draining


def test_request_budget(ray_serving):
    door = _door(ray_serving, **{"frontdoor.limits.requests_per_s": 0.5, "frontdoor.limits.request_burst": 2})
    try:
        with grpc.insecure_channel(door.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(2):
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=_bearer("acme"))
            err = _error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=_bearer("acme")))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(err)["QuotaFailure"].violations[0].subject == "tenant:acme/requests"
            assert 0 < retry_delay_s(err) <= 2.0
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=_bearer("globex"))
    finally:
        door.close()


# ───────────────────────────────────────── TLS ─────────────────────────────────────────

def _certificates(tmp_path):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject, key, issuer, issuer_key, *, ca=False, sans=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}

    def write(stem, cert, key):
        files[stem + ".crt"] = tmp_path / f"{stem}.crt"
        files[stem + ".crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[stem + ".key"] = tmp_path / f"{stem}.key"
        files[stem + ".key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test-ca", ca_key, "test-ca", ca_key, ca=True)
    write("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", issue("127.0.0.1", server_key, "test-ca", ca_key, sans=[
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", issue("client-acme", client_key, "test-ca", ca_key), client_key)
    return {k: v.read_bytes() for k, v in files.items()}, files


def test_tls_and_mutual_tls(ray_serving, tmp_path):
    pem, paths = _certificates(tmp_path)
    tls = _door(ray_serving, **{"frontdoor.tls.cert_file": str(paths["server.crt"]),
                                "frontdoor.tls.key_file": str(paths["server.key"])})
    try:
        with grpc.secure_channel(tls.target, grpc.ssl_channel_credentials(pem["ca.crt"])) as channel:
            info = pb_grpc.InferenceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                                                metadata=_bearer("acme"))
            assert info.engine == "torch"
        with grpc.insecure_channel(tls.target) as plaintext:  # a plaintext client cannot talk to it
            err = _error(lambda: pb_grpc.InferenceStub(plaintext).GetModelInfo(pb.GetModelInfoRequest(), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        tls.close()

    mtls = _door(ray_serving, **{"frontdoor.tls.cert_file": str(paths["server.crt"]),
                                 "frontdoor.tls.key_file": str(paths["server.key"]),
                                 "frontdoor.tls.client_ca_file": str(paths["ca.crt"])})
    try:
        with_cert = grpc.ssl_channel_credentials(pem["ca.crt"], pem["client.key"], pem["client.crt"])
        with grpc.secure_channel(mtls.target, with_cert) as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=_bearer("acme")).engine == "torch"
        with grpc.secure_channel(mtls.target, grpc.ssl_channel_credentials(pem["ca.crt"])) as channel:
            err = _error(lambda: pb_grpc.InferenceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=5, metadata=_bearer("acme")))
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no RPC ever runs
    finally:
        mtls.close()


def test_unauthenticated_mode_is_refused_off_loopback(ray_serving):
    from cluster.config import ConfigError
    from cluster.frontdoor.server import FrontdoorServer

    config = load_config(env={}, overrides={"frontdoor.host": "0.0.0.0", "frontdoor.grpc_port": 0, "frontdoor.http_port": -1,
                                            "frontdoor.metrics_port": -1})
    with pytest.raises(ConfigError, match="frontdoor.auth"):
        FrontdoorServer(ray_serving.handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()),
                        api_keys=ApiKeys([]))._auth()


# ───────────────────────────────────────── drain ─────────────────────────────────────────

def test_drain_finishes_in_flight_refuses_new_and_reports_not_serving(ray_serving):
    door = _door(ray_serving)
    try:
        with grpc.insecure_channel(door.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            stream = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(
                max_tokens=80, ignore_stop=True)), timeout=60, metadata=_bearer("acme"))
            first = next(stream)
            assert first.HasField("chunk")
            drained = {}
            drainer = threading.Thread(target=lambda: drained.update(response=admin_pb2_grpc.AdminStub(channel).Drain(
                admin_pb2.DrainRequest(timeout_s=30), timeout=60, metadata=_bearer("ops"))))
            drainer.start()
            deadline = time.monotonic() + 10
            while not door.server.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            for service in ("", "gptoss.v1.Inference", "gptoss.v1.Admin"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            err = _error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=_bearer("acme")))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert details(err)["ErrorInfo"].reason == "DRAINING" and retry_delay_s(err) > 0
            rest = list(stream)  # the stream that was in flight runs to its end
            assert rest[-1].complete.usage.completion_tokens == 80
            drainer.join(60)
            assert drained["response"].in_flight_at_start == 1 and drained["response"].in_flight_at_end == 0

            admin = admin_pb2_grpc.AdminStub(channel)  # Resume undoes the drain
            err = _error(lambda: admin.Resume(admin_pb2.ResumeRequest(), timeout=5, metadata=_bearer("acme")))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert admin.Resume(admin_pb2.ResumeRequest(), timeout=5, metadata=_bearer("ops")).was_draining
            for service in ("", "gptoss.v1.Inference", "gptoss.v1.Admin"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=_bearer("acme")).model_name
            assert not admin.Resume(admin_pb2.ResumeRequest(), timeout=5, metadata=_bearer("ops")).was_draining
    finally:
        door.close()
