"""End to end: the deploy/ topology without a container engine. Two `condery serve`
replicas on one SeaweedFS bucket with Redis between them, behind a real nginx running the
shipped deploy/nginx.conf; real skopeo and podman pull through it, with blob redirects to
presigned SeaweedFS URLs off and on. And a name built by one replica is served by the
other from the bucket, without building or uploading a layer."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.clients import Podman, oci_validate, skopeo_copy
from tests.fixtures.nginx import DEPLOY_CONF, check_config, deploy_conf, nginx
from tests.fixtures.procs import running
from tests.fixtures.redis_server import RedisServer, redis  # noqa: F401 - the fixture
from tests.test_e2e import NoRedirect, Registry, serve
from tests.test_e2e_observability import samples

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def two_replicas(tmp: Path, channel: str, base_layout: Path, seaweed, redis_url: str,
                 redirect: bool = False) -> Iterator[tuple[list[Registry], str]]:
    """Two replicas on one new bucket, each with its own package cache; and the bucket."""
    bucket = seaweed.create_bucket()
    storage = {"backend": "s3", "bucket": bucket, "endpoint_url": seaweed.endpoint_url,
               "region": "us-east-1", "redirect": redirect}
    with contextlib.ExitStack() as stack:
        started = []
        for name in ("r1", "r2"):
            (tmp / name).mkdir()
            # As deploy/compose.yaml: every connection comes from nginx's one address.
            argv, store, port = serve(tmp / name, [channel], f"oci:{base_layout}:bookworm", storage=storage,
                                      coordination={"backend": "redis", "url": redis_url},
                                      max_connections=1000, max_connections_per_client=1000)
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(running(argv, url=url + "/v2/", env=seaweed.env, log_path=tmp / name / "condery.log",
                                        timeout=60))
            started.append(Registry(url, f"127.0.0.1:{port}", store))
        yield started, bucket


def bucket_keys(seaweed, bucket: str, prefix: str) -> set[str]:
    pages = seaweed.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def metric(registry: Registry, name: str, **labels: str) -> float:
    return samples(registry).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("redirect", [False, True], ids=["proxied-blobs", "redirected-blobs"])
def test_skopeo_and_podman_pull_through_nginx_over_two_replicas(
    tmp_path: Path, fixture_channel: Path, base_layout: Path, seaweed, redis: RedisServer, podman: Podman,
    redirect: bool,
) -> None:
    with two_replicas(tmp_path, str(fixture_channel), base_layout, seaweed, redis.url, redirect) as (replicas, _), \
            nginx(tmp_path / "nginx", [r.host for r in replicas]) as proxy:
        layout = skopeo_copy(f"docker://{proxy.host}/xz:latest", tmp_path / "oci", "latest")
        oci_validate(layout)
        image_id = podman.pull(f"{proxy.host}/xz:latest")
        assert podman.inspect_image(image_id)["RootFS"]["Layers"]
        blob_statuses = {line.split()[0] for line in proxy.access_log() if "/v2/xz/blobs/" in line}
        assert blob_statuses == ({"307"} if redirect else {"200"})  # what skopeo and podman were given

        front = Registry(proxy.url, proxy.host, tmp_path)
        status, headers, body = front.get("/v2/xz/manifests/latest")
        assert status == 200, body
        layer = json.loads(body)["layers"][-1]["digest"]
        blob_url = f"{proxy.url}/v2/xz/blobs/{layer}"
        if redirect:
            # nginx passes the 307 through (and does not cache it); the clients followed it.
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.build_opener(NoRedirect).open(blob_url)
            assert answer.value.code == 307 and answer.value.headers["Location"].startswith(seaweed.endpoint_url)
        else:
            with urllib.request.urlopen(blob_url) as answer:
                assert answer.status == 200 and answer.headers["Docker-Content-Digest"] == layer

        # Round robin over both replicas ("-": a blob from nginx's cache, no upstream); no
        # request failed at the proxy or the replicas.
        log = proxy.access_log()
        answered_by = {line.split()[1] for line in log if "/v2/xz/" in line} - {"-"}
        assert answered_by == {r.host for r in replicas}, log
        assert not [line for line in log if line.split()[0].startswith("5")], log
        builds = sum(metric(r, "condery_builds_total", result="ok") for r in replicas)
        assert builds == 1  # one cold build for both replicas (Redis single flight, one bucket)


def test_the_second_replica_answers_a_name_the_first_built_without_building(
    tmp_path: Path, fixture_channel: Path, base_layout: Path, seaweed, redis: RedisServer,
) -> None:
    with two_replicas(tmp_path, str(fixture_channel), base_layout, seaweed, redis.url) as ((first, second), bucket):
        status, headers_1, body = first.get("/v2/python/tqdm/xz/manifests/latest")
        assert status == 200, body
        assert metric(first, "condery_layers_total", result="built") == 5  # python, tqdm, xz and 2 deps
        blobs_before = bucket_keys(seaweed, bucket, "blobs/")
        layer_records_before = bucket_keys(seaweed, bucket, "records/layers/")

        status, headers_2, body_2 = second.get("/v2/python/tqdm/xz/manifests/latest")
        assert status == 200, body_2
        assert headers_2["Docker-Content-Digest"] == headers_1["Docker-Content-Digest"]
        assert body_2 == body
        # The image record in the bucket answers it: no build at all, so no layer built or
        # reused, nothing uploaded.
        assert metric(second, "condery_builds_total", result="ok") == 0
        assert metric(second, "condery_layers_total", result="built") == 0
        assert metric(second, "condery_layers_total", result="reused") == 0
        assert metric(second, "condery_layer_bytes_total") == 0
        assert bucket_keys(seaweed, bucket, "blobs/") == blobs_before
        assert bucket_keys(seaweed, bucket, "records/layers/") == layer_records_before


def test_the_mapped_deploy_conf_keeps_its_settings(tmp_path: Path) -> None:
    """The fixture maps only names and paths; without rate limits (bench) nginx -t still passes."""
    shipped = DEPLOY_CONF.read_text()
    mapped = deploy_conf(["127.0.0.1:1", "127.0.0.1:2"], 3, tmp_path / "cache")
    assert "server 127.0.0.1:1;" in mapped and "server 127.0.0.1:2;" in mapped and "condery-" not in mapped
    assert "listen 127.0.0.1:3;" in mapped
    for setting in ("proxy_read_timeout 1980s;", "proxy_next_upstream error;", "proxy_max_temp_file_size 0;",
                    "proxy_cache_valid 200 30d;", "limit_req  zone=condery_requests"):
        assert setting in shipped and setting in mapped
    unlimited = deploy_conf(["127.0.0.1:1"], 3, tmp_path / "cache", rate_limits=False)
    assert "limit_req " not in unlimited and "limit_conn " not in unlimited and "limit_req_zone" in unlimited
    check_config(unlimited, tmp_path)
