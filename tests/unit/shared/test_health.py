from jetscribe.shared.health import Readiness


def test_ready_only_once_every_check_is_up_and_not_after_one_goes_down():
    r = Readiness("transcriber").need("streams", "model")
    assert not r.ready and r.report()["checks"] == {"model": "starting", "streams": "starting"}
    r.up("streams")
    assert not r.ready
    r.up("model")
    assert r.ready and r.report() == {
        "service": "transcriber",
        "ready": True,
        "checks": {"model": "ok", "streams": "ok"},
    }
    r.down("streams", "NATS disconnected")
    assert not r.ready and r.report()["checks"]["streams"] == "NATS disconnected"
    r.need("streams")  # declaring again does not reset a known state
    assert r.report()["checks"]["streams"] == "NATS disconnected"
