"""Logs, metrics and health, in process: formatters, route labels, the build report,
and /healthz, /readyz, /metrics over real HTTP on a real filesystem store."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
from pathlib import Path

import pytest
import rattler
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from condery.build.service import ImageService
from condery.config import load_config
from condery.layers.package_layer import build_package_layer
from condery.observability.build_report import BuildReport, union_seconds
from condery.observability.logs import JsonFormatter, TextFormatter, configure_logging, event
from condery.observability.metrics import ROUTES, Metrics, route_of
from condery.common.redact import RedactingFilter
from condery.registry.server import create_app
from condery.build.state import AppState
from tests.fixtures.condapkg import index_channel, write_bulk_package
from tests.fixtures.disk import tmpfs

SECRET_URL = "https://user:hunter2@conda.example/t/TOKEN123/channel/linux-64/x.conda"


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2/", "/v2/"),
        ("/v2", "/v2/"),
        ("/v2/python/numpy/manifests/latest", "manifests"),
        ("/v2/numpy/blobs/sha256:" + "a" * 64, "blobs"),
        ("/v2/numpy/blobs/uploads/", "other"),
        ("/v2/numpy/tags/list", "tags"),
        ("/v2/numpy/referrers/sha256:" + "a" * 64, "referrers"),
        ("/metrics", "metrics"),
        ("/healthz", "healthz"),
        ("/readyz", "readyz"),
        ("/api/v1/builds/abc", "api"),
        ("/", "landing"),
        ("/images/python/numpy/latest", "landing"),
        ("/static/condery.css", "landing"),
        ("/v2/manifests", "other"),
        ("/favicon.ico", "other"),
    ],
)
def test_route_labels_are_bounded(path: str, route: str) -> None:
    assert route_of(path) == route
    assert route in ROUTES


def _lines(formatter: logging.Formatter, emit) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("condery.test-observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


def _emit_all(logger: logging.Logger) -> None:
    event(logger, logging.INFO, "request", method="GET", path="/v2/a\nINFO forged line", status=200,
          bytes=12, duration_s=0.0123, client="127.0.0.1")
    event(logger, logging.WARNING, "build ended", result="failed", reason=f"cannot fetch {SECRET_URL}",
          platforms=("linux-64", "linux-aarch64"))
    logger.info("plain message quoting %s", SECRET_URL)
    try:
        raise RuntimeError(f"download failed from {SECRET_URL}")
    except RuntimeError:
        logger.exception("failed")


def test_json_lines_parse_and_carry_fields_without_secrets() -> None:
    lines = _lines(JsonFormatter(), _emit_all)
    assert len(lines) == 4  # the newline in a path does not make a second line
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= set(record)
        assert record["ts"].endswith("+00:00")
    request, build, plain, failed = records
    assert request["msg"] == "request" and request["status"] == 200 and request["bytes"] == 12
    assert request["path"] == "/v2/a\nINFO forged line" and request["client"] == "127.0.0.1"
    assert build["level"] == "WARNING" and build["platforms"] == ["linux-64", "linux-aarch64"]
    assert "https://conda.example/channel/linux-64/x.conda" in build["reason"]
    assert "RuntimeError" in failed["exc"] or "traceback withheld" in failed["exc"]
    text = "\n".join(lines)
    assert "hunter2" not in text and "TOKEN123" not in text


def test_text_lines_append_fields_and_quote_untrusted_values() -> None:
    lines = _lines(TextFormatter(), _emit_all)
    request = lines[0]
    assert " INFO condery.test-observability: request method=GET " in request
    assert 'path="/v2/a\\nINFO forged line" status=200 bytes=12 duration_s=0.012 client=127.0.0.1' in request
    assert "platforms=linux-64,linux-aarch64" in lines[1]
    text = "\n".join(lines)
    assert "hunter2" not in text and "TOKEN123" not in text
    assert not any(line.startswith("INFO forged") for line in lines)


def test_union_seconds_counts_parallel_work_once() -> None:
    assert union_seconds([]) == 0
    assert union_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_seconds([(0, 10), (2, 3)]) == 10


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_build_report_moves_the_metrics_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="condery.build"):
        report = BuildReport.start("python/xz", "latest", ["linux-64"], metrics)
        report.solved(3, report.started)
        report.layer(True, 1000)
        report.layer(True, 24)
        report.layer(False, 500)
        report.stored(10)
        report.downloaded(4096)
        with report.timed("fetch"):
            pass
        report.finish()
        report.finish("a second end is ignored")
    assert _value(metrics, "condery_builds_total", result="ok") == 1
    assert _value(metrics, "condery_builds_total", result="failed") == 0
    assert _value(metrics, "condery_layers_total", result="built") == 2
    assert _value(metrics, "condery_layers_total", result="reused") == 1
    assert _value(metrics, "condery_layer_bytes_total") == 1034
    assert _value(metrics, "condery_package_download_bytes_total") == 4096
    assert _value(metrics, "condery_solve_duration_seconds_count") == 1
    assert _value(metrics, "condery_build_duration_seconds_count") == 1
    started, ended = [r for r in caplog.records if r.name == "condery.build"]
    assert started.getMessage() == "build started" and ended.getMessage() == "build ended"
    fields = ended.condery_fields
    assert fields["result"] == "ok" and fields["packages"] == 3 and fields["layers_built"] == 2
    assert fields["layers_reused"] == 1 and fields["bytes_stored"] == 1034
    assert {"solve_s", "fetch_s", "layers_s", "manifests_s", "duration_s"} <= set(fields)



@pytest.mark.parametrize("stream", [True, False])
async def test_a_layer_build_reports_where_its_time_goes(tmp_path: Path, stream: bool) -> None:
    """Each step of a cold package layer build is timed (bench/bench_scale.py prints them);
    a layer written straight from the archive has no install step, rattler's install has."""
    channel = tmp_path / "channel"
    write_bulk_package(channel, "bulk", size=4 << 20, small_files=200)
    index_channel(channel)
    records = await rattler.solve([str(channel)], ["bulk"], platforms=["linux-64"])
    report = BuildReport("bulk", "latest", ("linux-64",))
    blob = await build_package_layer(records[0], python_record=None, prefix="/opt/conda", platform="linux-64",
                                     work_dir=tmp_path / "work", package_cache_dir=tmp_path / "pkgs", report=report,
                                     stream=stream)
    seconds = report.phase_seconds()
    assert blob.size > 0 and report.download_bytes > 0
    assert all(seconds[step] > 0 for step in ("verify", "check", "pack")), seconds
    assert (seconds["install"] > 0) == (not stream), seconds
    # Steps are parts of their phases: verify of fetch, the rest of layers.
    assert seconds["verify"] <= seconds["fetch"]
    assert seconds["check"] + seconds["install"] + seconds["pack"] <= seconds["layers"]
    assert seconds["store"] == 0  # the caller stores the layer (build/image_layers.py times it)


@contextlib.asynccontextmanager
async def _served(store_path: Path, fixture_channel: Path, base_layout: Path):
    config = load_config(environ={}, channels=[str(fixture_channel)], base_image=f"oci:{base_layout}:bookworm",
                         storage={"backend": "filesystem", "path": str(store_path)},
                         package_cache=str(store_path.parent / "pkgs"))
    state = await AppState.open(config)
    client = TestClient(TestServer(create_app(ImageService(state), state.store, state.metrics)))
    await client.start_server()
    try:
        yield client, state
    finally:
        await client.close()
        await state.close()


def _families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_health_and_metrics_over_http(tmp_path: Path, fixture_channel: Path, base_layout: Path) -> None:
    async with _served(tmp_path / "store", fixture_channel, base_layout) as (client, state):
        response = await client.get("/healthz")
        assert response.status == 200 and await response.json() == {"status": "ok"}
        response = await client.get("/readyz")
        assert response.status == 200 and await response.json() == {"status": "ready"}
        await client.get("/v2/")
        secret_name = "some-private-project-name"
        assert (await client.get(f"/v2/{secret_name}/blobs/sha256:{'0' * 64}")).status == 404

        response = await client.get("/metrics")
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
        families = _families(text)
        for name in ("condery_http_requests", "condery_http_request_duration_seconds", "condery_builds",
                     "condery_build_duration_seconds", "condery_builds_in_flight", "condery_layers",
                     "condery_layer_bytes", "condery_solve_duration_seconds", "condery_package_download_bytes"):
            assert name in families, name
        requests = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
                    for s in families["condery_http_requests"].samples if s.name.endswith("_total")}
        assert requests[("GET", "blobs", "404")] == 1
        assert requests[("GET", "healthz", "200")] == 1 and requests[("GET", "readyz", "200")] == 1
        assert requests[("GET", "/v2/", "200")] == 1
        assert secret_name not in text  # route labels, never image names
        assert families["condery_builds_in_flight"].samples[0].value == 0
        # A second app in the same process has its own registry: nothing carried over.
        assert _families(Metrics().render().decode())["condery_http_requests"].samples == []


async def test_readyz_is_503_when_the_store_turns_read_only(
    tmp_path: Path, fixture_channel: Path, base_layout: Path
) -> None:
    # As root chmod does not stop a write: a tmpfs remounted read-only does.
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        async with _served(mnt / "store", fixture_channel, base_layout) as (client, _):
            assert (await client.get("/readyz")).status == 200
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            response = await client.get("/readyz")
            assert response.status == 503
            (error,) = (await response.json())["errors"]
            assert error["code"] == "UNAVAILABLE" and "read-only" in error["message"]
            assert str(mnt) not in error["message"]
            assert (await client.get("/healthz")).status == 200  # alive, just not ready
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
            assert (await client.get("/readyz")).status == 200


def test_configure_logging_json_redacts_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(False, "json")  # what `condery serve` does with log_format: json
        event(logging.getLogger("condery.build"), logging.WARNING, "build ended", result="failed",
              reason=f"cannot fetch {SECRET_URL}")
        logging.getLogger("rattler").error("fetch of %s failed", SECRET_URL)  # a third-party line too
        logging.getLogger("condery").debug("not shown without -v")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["logger"] for r in records] == ["condery.build", "rattler"]
    assert "hunter2" not in "".join(lines) and "TOKEN123" not in "".join(lines)
    assert records[0]["reason"] == "cannot fetch https://conda.example/channel/linux-64/x.conda"
