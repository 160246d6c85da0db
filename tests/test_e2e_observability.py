"""End to end: what an operator sees of a real `condery serve` — its log (text and JSON),
/metrics after cold and warm pulls by skopeo, and /healthz and /readyz, with /readyz
going to 503 when the S3 server behind the store stops."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.clients import skopeo_copy
from tests.fixtures.seaweed import seaweed_s3
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

REQUEST_FIELDS = {"method", "path", "status", "bytes", "duration_s", "client"}
BUILD_END_FIELDS = {"result", "name", "tag", "platforms", "packages", "layers_built", "layers_reused",
                    "bytes_stored", "solve_s", "fetch_s", "layers_s", "manifests_s", "duration_s"}


def samples(registry: Registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = registry.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_json_log_and_metrics_after_cold_and_warm_pulls(tmp_path: Path, fixture_channel, base_layout) -> None:
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm", log_format="json") as registry:
        start = samples(registry)
        skopeo_copy(f"{registry.host}/xz:latest", tmp_path / "cold", "latest")
        cold = samples(registry)
        skopeo_copy(f"{registry.host}/xz:latest", tmp_path / "warm", "latest")
        warm = samples(registry)
        skopeo_copy(f"{registry.host}/xz/tzdata:latest", tmp_path / "shared", "latest")
        shared = samples(registry)

    assert moved(start, cold, "condery_builds_total", result="ok") == 1
    assert moved(start, cold, "condery_builds_total", result="failed") == 0
    built = moved(start, cold, "condery_layers_total", result="built")
    assert built >= 1 and moved(start, cold, "condery_layers_total", result="reused") == 0
    assert moved(start, cold, "condery_layer_bytes_total") > 0
    assert moved(start, cold, "condery_package_download_bytes_total") > 0
    assert moved(start, cold, "condery_solve_duration_seconds_count") == 1
    assert moved(start, cold, "condery_build_duration_seconds_count") == 1
    assert moved(start, cold, "condery_http_requests_total", method="GET", route="manifests", status="200") >= 1
    assert moved(start, cold, "condery_http_requests_total", method="GET", route="blobs", status="200") >= 1
    assert cold[("condery_builds_in_flight", ())] == 0
    # The warm pull builds nothing: every counter of builds and layers stays put.
    for name, labels in [("condery_builds_total", {"result": "ok"}), ("condery_layers_total", {"result": "built"}),
                         ("condery_layers_total", {"result": "reused"}), ("condery_layer_bytes_total", {})]:
        assert moved(cold, warm, name, **labels) == 0, name
    assert moved(cold, warm, "condery_http_requests_total", method="GET", route="manifests", status="200") >= 1
    # A second name sharing xz's layers: those are reused, only tzdata's is built.
    assert moved(warm, shared, "condery_builds_total", result="ok") == 1
    assert moved(warm, shared, "condery_layers_total", result="reused") >= 1
    assert moved(warm, shared, "condery_layers_total", result="built") >= 1

    lines = (tmp_path / "condery.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, whatever logged it
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    requests = [r for r in records if r["logger"] == "condery.access"]
    assert all(REQUEST_FIELDS <= set(r) for r in requests)
    assert any(r["path"] == "/v2/xz/manifests/latest" and r["status"] == 200 and r["client"] == "127.0.0.1"
               for r in requests)
    assert any("/blobs/sha256:" in r["path"] and r["status"] == 200 and r["bytes"] > 0 for r in requests)
    started = [r for r in records if r["msg"] == "build started"]
    ended = [r for r in records if r["msg"] == "build ended"]
    assert [(r["name"], r["tag"]) for r in started] == [("xz", "latest"), ("tzdata/xz", "latest")]
    assert len(ended) == 2 and all(BUILD_END_FIELDS <= set(r) and r["result"] == "ok" for r in ended)
    first = ended[0]
    assert first["platforms"] == ["linux-64"] and first["layers_built"] == built
    assert first["packages"] >= 1 and first["bytes_stored"] > 0 and first["duration_s"] >= first["solve_s"] > 0


def test_text_log_has_request_and_build_lines_with_reasons(tmp_path: Path, fixture_channel, base_layout) -> None:
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm") as registry:
        assert registry.get("/v2/xz/manifests/latest")[0] == 200
        status, code, message = registry.error_code("/v2/no-such-package-anywhere/manifests/latest")
        assert (status, code) == (404, "MANIFEST_UNKNOWN")
    log = (tmp_path / "condery.log").read_text()
    lines = log.splitlines()
    assert any("condery.access: request method=GET path=/v2/xz/manifests/latest status=200 bytes=" in line
               and " client=127.0.0.1" in line for line in lines)
    assert any("condery.build: build started name=xz tag=latest platforms=linux-64" in line for line in lines)
    assert any("condery.build: build ended result=ok name=xz " in line and " layers_built=" in line
               and " fetch_s=" in line for line in lines)
    failed = [line for line in lines if "build ended result=failed name=no-such-package-anywhere" in line]
    assert len(failed) == 1 and "reason=" in failed[0] and "MANIFEST_UNKNOWN" in failed[0]
    refused = [line for line in lines if "path=/v2/no-such-package-anywhere/manifests/latest status=404" in line]
    assert len(refused) == 1 and "error=MANIFEST_UNKNOWN" in refused[0]


def test_health_and_readiness_follow_the_s3_server(tmp_path: Path, fixture_channel, base_layout) -> None:
    # A SeaweedFS of this test's own (not the session's): it is stopped half-way.
    with contextlib.ExitStack() as weed:
        s3 = weed.enter_context(seaweed_s3(tmp_path / "weed"))
        storage = {"backend": "s3", "bucket": s3.create_bucket(), "endpoint_url": s3.endpoint_url,
                   "region": "us-east-1"}
        with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm", env=s3.env,
                     storage=storage) as registry:
            assert registry.get("/healthz")[0] == 200
            status, _, body = registry.get("/readyz")
            assert status == 200 and json.loads(body) == {"status": "ready"}
            weed.close()  # the S3 server stops; condery goes on serving
            status, headers, body = registry.get("/readyz")
            assert status == 503, body
            (error,) = json.loads(body)["errors"]
            assert error["code"] == "UNAVAILABLE" and error["message"].startswith("not ready: ")
            assert s3.env["AWS_SECRET_ACCESS_KEY"] not in body.decode() and str(tmp_path) not in body.decode()
            assert registry.get("/healthz")[0] == 200  # alive, only not ready
    log = (tmp_path / "condery.log").read_text()
    assert "path=/readyz status=503" in log and "error=UNAVAILABLE" in log
