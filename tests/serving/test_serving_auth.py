"""Bearer-token auth the gRPC way, against a real in-process server on loopback: one server
interceptor checks every method but health; the client sends the token as call credentials and
refuses to send it in clear to a non-loopback address unless told `insecure_token`.

No test sends anything to a non-loopback address: the refusal happens while the channel is
built, and a gRPC channel makes no connection before its first call.
"""
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core.errors import ConfigError
from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc
from serving.cli import main as serve_main
from serving.client import ScoringClient, ScoringError, insecure_token_channel
from serving.security import is_loopback_target

Code = grpc.StatusCode
TOKEN = "s3cret-token"
# TEST-NET addresses (RFC 5737, RFC 3849) and names: never loopback, never contacted here.
REMOTE_TARGETS = ["192.0.2.10:50051", "dns:///scoring.example.org:443", "scoring.example.org:50051",
                  "[2001:db8::1]:50051", "ipv4:198.51.100.7:50051", "10.0.0.5"]
LOOPBACK_TARGETS = ["127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "LOCALHOST:1",
                    "[::1]:50051", "::1", "dns:///localhost:50051", "ipv4:127.0.0.1:50051",
                    "unix:/tmp/milroi.sock", "unix:///tmp/milroi.sock"]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(f"  {TOKEN}\n")
    return path


@pytest.fixture
def server(make_server, token_file):
    return make_server(token_file=str(token_file))


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _every_rpc(stub, metadata):
    """One call of each method of the scoring service and of reflection, with `metadata`."""
    tiles = pb.ScoreTilesRequest(tiles=bytes(224 * 224 * 3), count=1, tile_size=224)
    reflection = reflection_pb2_grpc.ServerReflectionStub(stub._channel)
    return {
        "GetModel": lambda: stub.GetModel(pb.GetModelRequest(), metadata=metadata, timeout=30),
        "ScoreSlide": lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="blank.tiff"),
                                                   metadata=metadata, timeout=60)),
        "ScoreTiles": lambda: list(stub.ScoreTiles(iter([tiles]), metadata=metadata, timeout=60)),
        "ServerReflectionInfo": lambda: list(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=metadata, timeout=30)),
    }


class _Stub(pb_grpc.SlideScoringStub):
    def __init__(self, channel):
        super().__init__(channel)
        self._channel = channel


def test_every_method_but_health_needs_the_token(server):
    stub = _Stub(server.channel())
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
                     [("authorization", f"Basic {TOKEN}")], [("authorization", "Bearer ")]):
        for method, call in _every_rpc(stub, metadata).items():
            code, details = _code(call)
            assert code == Code.UNAUTHENTICATED, (method, metadata, code)
            assert "bearer token" in details
    ok = [("authorization", f"Bearer {TOKEN}")]
    calls = _every_rpc(stub, ok)
    assert calls["GetModel"]().tile_size == 224
    assert calls["ScoreSlide"]()[-1].summary.label == "no_tissue"
    assert len(calls["ScoreTiles"]()[0].score) == 1
    services = {s.name for s in calls["ServerReflectionInfo"]()[0].list_services_response.service}
    assert "milroi.v1.SlideScoring" in services
    # Health needs no token: Check and Watch.
    health = health_pb2_grpc.HealthStub(server.channel())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
    watch = health.Watch(health_pb2.HealthCheckRequest(service="milroi.v1.SlideScoring"),
                         timeout=10)
    assert next(watch).status == serving
    watch.cancel()
    # Refusals are counted like every other outcome.
    metrics = server.server.metrics
    assert metrics.requests.labels("GetModel", "UNAUTHENTICATED")._value.get() == 5


def test_client_sends_the_token_as_call_credentials_on_loopback(server):
    with ScoringClient(server.address, token=TOKEN, timeout=60) as client:
        client.wait_until_serving(10)
        assert client.get_model().input_px == 224
        scores = client.score_tiles(np.zeros((2, 224, 224, 3), np.uint8))
        assert scores.shape == (2,) and np.isfinite(scores).all()
        assert client.score_slide_all("blank.tiff").summary.label == "no_tissue"
    for token in (None, "wrong"):
        with ScoringClient(server.address, token=token, retries=3) as client, \
                pytest.raises(ScoringError) as err:
            client.get_model(timeout=30)
        assert err.value.code == Code.UNAUTHENTICATED and err.value.attempts == 1


def test_token_over_tls(make_server, token_file, tmp_path):
    from server_testing import write_self_signed_cert

    cert, key = write_self_signed_cert(tmp_path)
    server = make_server(token_file=str(token_file), tls_cert=str(cert), tls_key=str(key))
    with ScoringClient(f"127.0.0.1:{server.port}", token=TOKEN, tls_ca=cert) as client:
        assert client.get_model(timeout=30).head
    with ScoringClient(f"127.0.0.1:{server.port}", tls_ca=cert, retries=0) as client, \
            pytest.raises(ScoringError) as err:
        client.get_model(timeout=30)
    assert err.value.code == Code.UNAUTHENTICATED


@pytest.mark.parametrize("target", LOOPBACK_TARGETS)
def test_loopback_targets(target):
    assert is_loopback_target(target)
    ScoringClient(target, token=TOKEN).close()   # allowed (no call: nothing is sent)


@pytest.mark.parametrize("target", REMOTE_TARGETS)
def test_token_in_clear_to_a_remote_address_is_refused_unless_insecure_token(target, tmp_path):
    assert not is_loopback_target(target)
    with pytest.raises(ConfigError, match="--insecure-token"):
        ScoringClient(target, token=TOKEN)
    # Allowed: no token, TLS, or the user's explicit --insecure-token. The channels are only
    # built: gRPC connects at the first call, and none is made.
    ScoringClient(target).close()
    ScoringClient(target, token=TOKEN, tls=True).close()
    ScoringClient(target, token=TOKEN, insecure_token=True).close()


def test_insecure_token_channel_carries_the_token(server):
    """The --insecure-token channel (plaintext + the header), end to end against loopback."""
    stub = pb_grpc.SlideScoringStub(insecure_token_channel(server.address, TOKEN))
    assert stub.GetModel(pb.GetModelRequest(), timeout=30).tile_size == 224
    assert list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="blank.tiff"),
                                timeout=60))[-1].summary.label == "no_tissue"
    wrong = pb_grpc.SlideScoringStub(insecure_token_channel(server.address, "wrong"))
    assert _code(lambda: wrong.GetModel(pb.GetModelRequest(), timeout=30))[0] == \
        Code.UNAUTHENTICATED


def test_cli_refuses_then_allows_with_insecure_token(server, token_file, tmp_path, capsys):
    # Refused before any connection, for `client` and for the batch job's --server.
    for argv in (["client", "model", "--server", "192.0.2.10:50051"],
                 ["score", str(tmp_path), "--server", "192.0.2.10:50051",
                  "--out", str(tmp_path / "out")]):
        assert serve_main([*argv, "--token-file", str(token_file)]) == 1
        assert "--insecure-token" in capsys.readouterr().err
    # Loopback: call credentials, no flag needed; --insecure-token: the plaintext header.
    for extra in ([], ["--insecure-token"]):
        argv = ["client", "model", "--server", server.address, "--json",
                "--token-file", str(token_file), *extra]
        assert serve_main(argv) == 0
        assert '"tile_size": 224' in capsys.readouterr().out
    assert serve_main(["client", "model", "--server", server.address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_wire_message_rewrites_server_paths(tmp_path):
    """SlideRoots.wire_message on messages naming files under nested roots and a sibling."""
    from serving.security import SlideRoots

    outer, sibling = tmp_path / "slides", tmp_path / "slides2"
    inner = outer / "cohort"
    inner.mkdir(parents=True)
    sibling.mkdir()
    roots = SlideRoots([outer, inner])
    message = (f"cannot read slide {inner}/a/x.tif: TIFFReadDirectory: {inner}/a/x.tif; "
               f"see {outer}/other.tif, not {sibling}/y.tif")
    assert roots.wire_message(message, "a/x.tif", inner / "a" / "x.tif") == \
        f"cannot read slide a/x.tif: TIFFReadDirectory: a/x.tif; see other.tif, not {sibling}/y.tif"
    # A link's target is named by the link the client asked for.
    assert roots.wire_message(f"cannot read slide {outer}/real.tif: bad", "link.tif",
                              outer / "real.tif") == "cannot read slide link.tif: bad"
    assert roots.wire_message("no slide 'x.tif' under the slide roots", "x.tif") == \
        "no slide 'x.tif' under the slide roots"
