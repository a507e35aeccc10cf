"""The committed stubs are what serving/gen_proto.py makes from scoring.proto today."""

from serving.gen_proto import GENERATED, PROTO_ROOT, generate


def test_committed_stubs_match_the_proto(tmp_path):
    written = generate(tmp_path)
    assert [p.name for p in written] == list(GENERATED)
    for path in written:
        committed = PROTO_ROOT / "milroi" / "v1" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} differs from the stubs of scoring.proto: run python -m serving.gen_proto")


def test_grpc_stub_imports_the_package_module():
    text = (PROTO_ROOT / "milroi" / "v1" / "scoring_pb2_grpc.py").read_text()
    assert "from milroi.v1 import scoring_pb2 as" in text
    from milroi.v1 import scoring_pb2, scoring_pb2_grpc

    assert scoring_pb2_grpc.SlideScoringStub
    assert set(scoring_pb2.DESCRIPTOR.services_by_name["SlideScoring"].methods_by_name) == {
        "ScoreSlide", "ScoreTiles", "GetModel"}
