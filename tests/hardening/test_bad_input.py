"""Bad input against a real server: one documented status with a clear message, and the server
keeps serving (a good request succeeds after each). The table is docs/errors.md."""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from milroi.v1 import scoring_pb2 as pb
from milroi.v1 import scoring_pb2_grpc as pb_grpc

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def stub(bad_root_server):
    return pb_grpc.SlideScoringStub(grpc.insecure_channel(bad_root_server.address))


def rpc_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def still_serving(stub) -> None:
    """A good slide is scored to its summary."""
    responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="good.tif"), timeout=60))
    assert responses[-1].summary.tile_count == responses[0].header.tile_count > 0


@pytest.mark.parametrize("path,code,words", [
    ("empty.svs", Code.INVALID_ARGUMENT, ["empty.svs", "empty file (0 bytes)"]),
    ("truncated.tif", Code.INVALID_ARGUMENT, ["truncated.tif", "truncated"]),
    ("text.svs", Code.INVALID_ARGUMENT, ["text.svs", "not a slide format"]),
    ("plain.png", Code.INVALID_ARGUMENT, ["plain.png", "not a slide format"]),
    ("stripped.tif", Code.INVALID_ARGUMENT, ["stripped.tif", "not a slide format"]),
    ("huge_claim.tif", Code.INVALID_ARGUMENT, ["huge_claim.tif", "400000 x 400000", "header"]),
    ("no_pyramid_huge.tif", Code.INVALID_ARGUMENT, ["no_pyramid_huge.tif", "no pyramid level"]),
    ("broken.svs", Code.INVALID_ARGUMENT, ["broken.svs"]),
    ("missing.tif", Code.NOT_FOUND, ["no slide 'missing.tif'"]),
    (".", Code.INVALID_ARGUMENT, ["is a directory"]),
    ("../good/s0.tif", Code.PERMISSION_DENIED, ["'..'"]),
    ("sub/../../x.tif", Code.PERMISSION_DENIED, ["'..'"]),
    ("/etc/passwd", Code.PERMISSION_DENIED, ["relative"]),
    ("escape.tif", Code.PERMISSION_DENIED, ["outside the slide roots"]),
    ("linked_dir/secret.tif", Code.PERMISSION_DENIED, ["outside the slide roots"]),
    ("", Code.PERMISSION_DENIED, ["invalid slide path"]),
    ("good.tif\x00", Code.PERMISSION_DENIED, ["invalid slide path"]),
])
def test_bad_slide_gets_its_status_and_the_server_keeps_serving(stub, path, code, words):
    got, details = rpc_error(lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path=path),
                                                          timeout=30)))
    assert got == code, details
    for word in words:
        assert word in details
    still_serving(stub)


def test_corrupt_tile_data_mid_stream_ends_it_with_invalid_argument(stub):
    """Tiles that fail to decode only when read: header and the patches before them arrive,
    then INVALID_ARGUMENT naming the file and the failed read; no summary."""
    call = stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="corrupt_tiles.tif", chunk_size=1),
                           timeout=60)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            received.append(response.WhichOneof("kind"))
    assert info.value.code() == Code.INVALID_ARGUMENT
    details = info.value.details()
    assert "corrupt_tiles.tif" in details and "corrupt or truncated tile data" in details
    assert received[0] == "header" and "summary" not in received
    assert "patches" in received            # the tiles before the damage were scored and sent
    still_serving(stub)


def test_slide_without_tissue_is_ok_with_zero_tiles(stub):
    responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="blank.tif"), timeout=30))
    assert [r.WhichOneof("kind") for r in responses] == ["header", "summary"]
    summary = responses[-1].summary
    assert summary.tile_count == 0 and summary.label == "no_tissue" and math.isnan(summary.slide_score)
    assert list(summary.rois) == []


def test_single_level_tiled_tiff_is_scored_like_its_pyramidal_source(stub):
    """A tiled TIFF without a pyramid is a slide (tissue mask via read_level_resized): same tiles
    and, up to JPEG re-encoding, the same scores as the pyramidal slide it was copied from."""
    one = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="single_level.tif"), timeout=60))
    good = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="good.tif"), timeout=60))
    assert one[0].header.level_count == 1 and good[0].header.level_count > 1
    assert one[-1].summary.tile_count > 0
    def xy(rs):
        return np.concatenate([np.stack([r.patches.x, r.patches.y], 1)
                               for r in rs if r.HasField("patches")])
    # Tissue is the same up to the mask's level (one level: it is computed from level 0 resized).
    a, b = {tuple(p) for p in xy(one)}, {tuple(p) for p in xy(good)}
    assert len(a & b) >= 0.8 * max(len(a), len(b))


@pytest.mark.parametrize("fields,word", [
    (dict(min_tissue=1.5), "min_tissue"),
    (dict(min_tissue=0.0), "min_tissue"),
    (dict(min_tissue=-0.1), "min_tissue"),
    (dict(min_tissue=float("nan")), "min_tissue"),
    (dict(roi_threshold=0.0), "roi_threshold"),
    (dict(roi_threshold=1.0), "roi_threshold"),
    (dict(roi_threshold=float("nan")), "roi_threshold"),
    (dict(roi_threshold=float("inf")), "roi_threshold"),
    (dict(chunk_size=2**32 - 1), "chunk_size"),
])
def test_invalid_parameters(stub, fields, word):
    code, details = rpc_error(lambda: list(stub.ScoreSlide(
        pb.ScoreSlideRequest(slide_path="good.tif", **fields), timeout=30)))
    assert code == Code.INVALID_ARGUMENT and word in details
    still_serving(stub)


def tiles_request(count=1, size=224, nbytes=None, **kw) -> pb.ScoreTilesRequest:
    nbytes = count * size * size * 3 if nbytes is None else nbytes
    return pb.ScoreTilesRequest(tiles=bytes(nbytes), count=count, tile_size=size, **kw)


@pytest.mark.parametrize("request_,word", [
    (tiles_request(nbytes=10), "bytes"),
    (tiles_request(nbytes=224 * 224 * 3 + 1), "bytes"),
    (tiles_request(count=0, nbytes=0), "count"),
    (tiles_request(count=5000, nbytes=0), "count"),
    (tiles_request(size=256), "tile_size"),
    (tiles_request(x=[1, 2], y=[1, 2]), "x and y"),
    (tiles_request(x=[1], y=[]), "x and y"),
])
def test_score_tiles_bad_batches(stub, request_, word):
    good = tiles_request(count=2, x=[0, 224], y=[0, 0])
    # The good batch before the bad one is answered; the stream then ends with the status.
    call = stub.ScoreTiles(iter([good, request_]), timeout=30)
    first = next(call)
    assert len(first.score) == 2 and list(first.x) == [0, 224]
    code, details = rpc_error(lambda: list(call))
    assert code == Code.INVALID_ARGUMENT and word in details
    assert len(list(stub.ScoreTiles(iter([good]), timeout=30))[0].score) == 2


def test_oversized_message_is_resource_exhausted(stub):
    """Over the server's 64 MiB receive limit: refused by gRPC before any decoding."""
    count = 64 * 2**20 // (224 * 224 * 3) + 1
    code, details = rpc_error(lambda: list(stub.ScoreTiles(iter([tiles_request(count=count)]),
                                                           timeout=60)))
    assert code == Code.RESOURCE_EXHAUSTED, details
    still_serving(stub)


def test_token_missing_or_wrong_is_unauthenticated(make_in_process_server, bad_root, tmp_path):
    (tmp_path / "token").write_text("  s3cret-token\n")
    server = make_in_process_server([bad_root], token_file=str(tmp_path / "token"))
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    wrong_tokens = (
        None, [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")],
        [("authorization", "Basic s3cret-token")], [("authorization", "Bearer ")],
        [("authorization", "Bearer S3CRET-TOKEN")], [("authorization", "Bearer s3cret-toke")],
        [("authorization", "Bearer s3cret-token2")], [("authorization", "Bearers3cret-token")],
        [("authorisation", "Bearer s3cret-token")], [("x-authorization", "Bearer s3cret-token")],
        [("authorization", "Token s3cret-token")])
    assert len(wrong_tokens) == 12
    for metadata in wrong_tokens:
        # each call runs within this iteration (rpc_error below): `metadata` is current
        for call in (lambda: stub.GetModel(pb.GetModelRequest(), metadata=metadata,  # noqa: B023
                                           timeout=10),
                     lambda: list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="good.tif"),
                                                  metadata=metadata, timeout=10)),  # noqa: B023
                     lambda: list(stub.ScoreTiles(iter([tiles_request()]),
                                                  metadata=metadata, timeout=10))):  # noqa: B023
            code, details = rpc_error(call)
            assert code == Code.UNAUTHENTICATED and "bearer token" in details
    ok = [("authorization", "Bearer s3cret-token")]
    assert stub.GetModel(pb.GetModelRequest(), metadata=ok, timeout=10).tile_size == 224
    # Health needs no token (load balancers probe it).
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_special_files_get_a_clear_status_at_once(make_in_process_server, tmp_path, good_root):
    """A FIFO (opening it would wait for a writer for ever) and a character device are refused
    as not regular files, quickly, and the server keeps serving."""
    import os
    import shutil
    import stat
    import time

    root = tmp_path / "special"
    root.mkdir()
    shutil.copy(good_root / "s0.tif", root / "good.tif")
    os.mkfifo(root / "pipe.svs")
    names = ["pipe.svs"]
    try:   # root may create device nodes here; a container may refuse
        os.mknod(root / "null.tif", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        names.append("null.tif")
    except PermissionError:
        pass
    server = make_in_process_server([root])
    stub = pb_grpc.SlideScoringStub(grpc.insecure_channel(server.address))
    for name in names:
        started = time.monotonic()
        request = pb.ScoreSlideRequest(slide_path=name)
        code, details = rpc_error(lambda: list(stub.ScoreSlide(request, timeout=30)))  # noqa: B023
        assert code == Code.INVALID_ARGUMENT and name in details and "regular file" in details
        assert time.monotonic() - started < 10   # refused, not waiting on the file
        assert str(root) not in details
    responses = list(stub.ScoreSlide(pb.ScoreSlideRequest(slide_path="good.tif"), timeout=60))
    assert responses[-1].summary.tile_count > 0
