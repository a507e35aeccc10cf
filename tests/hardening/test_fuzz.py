"""Property-based fuzzing (hypothesis) of every request field of ScoreSlide, ScoreTiles and
GetModel against a real server: each request is answered with OK or a documented status within
its deadline, and the server stays healthy. Bounded: a fixed number of examples, each with a
deadline, derandomized so that CI runs the same requests."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc

Code = grpc.StatusCode
DEADLINE_S = 30
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SLIDE_STATUSES = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.PERMISSION_DENIED}
TILES_STATUSES = {Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}

KNOWN = ["good.tif", "blank.tif", "empty.svs", "text.svs", "truncated.tif", "huge_claim.tif",
         "escape.tif", "linked_dir/secret.tif", "../good.tif", "/good.tif", "./good.tif",
         "good.tif/", "nope.tif", ".", "linked_dir"]
paths = st.one_of(st.sampled_from(KNOWN), st.text(max_size=40),
                  st.lists(st.sampled_from(["..", ".", "good.tif", "linked_dir", "", "x"]),
                           max_size=4).map("/".join))
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.floats(0, 1, width=32))


@pytest.fixture(scope="module")
def channel(bad_root_server):
    return grpc.insecure_channel(bad_root_server.address)


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.details(), f"{exc.code()} without a message"
        return exc.code()
    return Code.OK


def assert_healthy(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


@FUZZ
@given(path=paths, chunk_size=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
       min_tissue=floats, roi_threshold=floats)
def test_fuzz_score_slide(channel, path, chunk_size, min_tissue, roi_threshold):
    fields = {k: v for k, v in (("min_tissue", min_tissue), ("roi_threshold", roi_threshold))
              if v is not None}
    request = pb.ScoreSlideRequest(slide_path=path, chunk_size=chunk_size, **fields)
    stub = pb_grpc.SlideScoringStub(channel)

    def score():
        responses = list(stub.ScoreSlide(request, timeout=DEADLINE_S))
        assert responses[0].HasField("header") and responses[-1].HasField("summary")

    assert status_of(score) in SLIDE_STATUSES
    assert_healthy(channel)


@FUZZ
@given(batches=st.lists(st.tuples(
    st.sampled_from([0, 1, 2, 3, 4096, 4097, 2**32 - 1]),                     # count
    st.sampled_from([0, 1, 223, 224, 225, 2**31]),                             # tile_size
    st.one_of(st.just(None), st.integers(0, 3 * 224 * 224 * 3 + 7)),           # byte count
    st.lists(st.integers(-2**63, 2**63 - 1), max_size=4),                       # x
    st.lists(st.integers(-2**63, 2**63 - 1), max_size=4)), min_size=0, max_size=3))
def test_fuzz_score_tiles(channel, batches):
    requests = []
    for count, size, nbytes, x, y in batches:
        if nbytes is None:   # the right byte count for count tiles of 224 (when small enough)
            nbytes = min(count, 3) * 224 * 224 * 3
        requests.append(pb.ScoreTilesRequest(tiles=bytes(nbytes), count=count, tile_size=size,
                                             x=x, y=y))
    stub = pb_grpc.SlideScoringStub(channel)
    replies = []

    def score():
        replies.extend(stub.ScoreTiles(iter(requests), timeout=DEADLINE_S))

    code = status_of(score)
    assert code in TILES_STATUSES
    for reply in replies:   # every answered batch is a valid one, answered in order
        assert all(0.0 <= s <= 1.0 for s in reply.score)
    if code == Code.OK:
        assert len(replies) == len(requests)
    assert_healthy(channel)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata=st.lists(st.tuples(st.sampled_from(["authorization", "x-foo", "user-agent-x"]),
                                   st.text(alphabet=st.characters(min_codepoint=32,
                                                                  max_codepoint=126),
                                           max_size=30)), max_size=3))
def test_fuzz_get_model(channel, metadata):
    info = pb_grpc.SlideScoringStub(channel).GetModel(pb.GetModelRequest(), metadata=metadata,
                                                      timeout=DEADLINE_S)
    assert info.tile_size == 224 and info.head == "chowder"   # no token configured: all OK
    # Unknown fields in the request bytes are ignored (proto3), not an error.
    raw = channel.unary_unary("/milroi.v1.SlideScoring/GetModel",
                              request_serializer=lambda b: b,
                              response_deserializer=pb.ModelInfo.FromString)
    assert raw(b"\x08\x01\x12\x03abc", timeout=DEADLINE_S).tile_size == 224
