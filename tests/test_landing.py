"""The landing page and image pages: the builds it lists, and in a real browser: Debian's chromium, headless,
driven by selenium through chromedriver, against a real `condery serve`.

The served channels include one whose package has an HTML payload in its build string
(rattler accepts any build string from repodata): it must show as text and never run.
A screenshot of the landing page is kept in the test's tmp dir (and is what
docs/landing.png was taken from).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from condery.build.service import ImageService
from condery.build.state import AppState
from condery.config import load_config
from condery.image.names import parse_name
from condery.image.tags import Latest
from condery.registry.landing import landing_page, register
from tests.fixtures.condapkg import index_channel, write_conda_package
from tests.fixtures.gated_channel import GatedChannel
from tests.test_build import gated, make_service, until  # noqa: F401 - fixtures
from tests.test_e2e import OCI_MANIFEST, Registry, condery

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags chromium's own connections are refused by a
# closed network and it may hang at start.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1200,1400",
)
HOSTILE_BUILD = "x_<img src=x onerror=window.pwned=1>"
HOSTILE_NAME = "<script>window.pwned=1</script>"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, fixture_channel, base_layout) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("landing")
    hostile = tmp / "hostile-channel"
    write_conda_package(hostile, "condery-xss", "1.0", HOSTILE_BUILD)
    index_channel(hostile)
    with condery(tmp, [str(fixture_channel), str(hostile)], f"oci:{base_layout}:bookworm") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); .ci/install adds them")
    profile = tempfile.mkdtemp(prefix="condery-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium cannot start here: {exc.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def not_pwned(driver) -> None:
    assert driver.execute_script("return window.pwned === undefined")


@pytest.mark.e2e
def test_landing_page_composes_names(registry: Registry, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(registry.url + "/")
    assert browser.title == f"condery at {registry.host}"
    served = text_of(browser, "#served")
    assert "hostile-channel" in served and "linux-64" in served and "bookworm" in served
    assert "jupyterlab" in text_of(browser, "table.meta")  # the jupyter meta-package's spec
    assert "No build in progress" in text_of(browser, "#builds")

    specs = browser.find_element(By.ID, "specs")
    specs.send_keys("xz >=5\ntzdata\ncondery-xss")
    wait_for(browser, lambda d: text_of(d, "#image-name") == "condery-xss/tzdata/xz.ge.5")
    lines = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#composed code.copy")]
    image = f"{registry.host}/condery-xss/tzdata/xz.ge.5:latest"
    assert lines == [f"docker pull {image}", f"podman run --rm -it {image}", f"image: {image}", f"container: {image}"]
    # The solved list from the images API, the hostile build string as text.
    wait_for(browser, lambda d: HOSTILE_BUILD in text_of(d, "#solved table.packages"))
    assert "5.2.5" in text_of(browser, "#solved")
    not_pwned(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, "#solved img")

    specs.send_keys("\nnumpy 1 py_0")  # live validation: the line that has no name is named
    wait_for(browser, lambda d: "build string" in text_of(d, "#problems"))
    assert "invalid" in specs.get_attribute("class")

    shot = tmp_path / "landing.png"
    specs.clear()
    specs.send_keys("xz >=5\ntzdata")
    wait_for(browser, lambda d: text_of(d, "#image-name") == "tzdata/xz.ge.5")
    wait_for(browser, lambda d: "condery-xss" not in text_of(d, "#solved") and "5.2.5" in text_of(d, "#solved"))
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


@pytest.mark.e2e
def test_composer_works_without_javascript(registry: Registry) -> None:
    status, _, body = registry.get("/?specs=" + urllib.parse.quote("scipy >1.0\nnumpy=1.26"))
    page = body.decode()
    assert status == 200 and "numpy.eq.1.26/scipy.gt.1.0" in page
    assert f"docker pull {registry.host}/numpy.eq.1.26/scipy.gt.1.0:latest" in page


@pytest.mark.e2e
def test_image_page_shows_the_lock_then_the_layers(registry: Registry, browser) -> None:
    browser.get(registry.url + "/images/xz/tzdata/latest")
    assert text_of(browser, "#name") == "tzdata/xz"
    assert "Not built yet" in text_of(browser, "#not-built")
    lock = text_of(browser, "pre.lock")
    assert lock.startswith("# platform: linux-64\n@EXPLICIT\n")
    assert any(line.startswith("file://") and "/xz-5.2.5" in line and "#sha256:" in line for line in lock.splitlines())

    status, headers, _ = registry.get("/v2/tzdata/xz/manifests/latest", accept=(OCI_MANIFEST,))
    assert status == 200
    browser.get(registry.url + "/images/tzdata/xz/latest")
    assert text_of(browser, "#digest") == headers["Docker-Content-Digest"]
    layers = text_of(browser, "#layers")
    assert "xz-5.2.5" in layers and "(base image)" in layers


@pytest.mark.e2e
def test_hostile_text_is_shown_not_run(registry: Registry, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.get(registry.url + "/images/condery-xss/latest")
    assert HOSTILE_BUILD in text_of(browser, "table.packages")
    assert not browser.find_elements(By.CSS_SELECTOR, "main img")
    not_pwned(browser)

    browser.get(registry.url + "/images/" + urllib.parse.quote(HOSTILE_NAME, safe="") + "/latest")
    assert "NAME_INVALID" in browser.title
    assert HOSTILE_NAME in text_of(browser, "#error")
    assert not browser.find_elements(By.CSS_SELECTOR, "main script")
    not_pwned(browser)

    # The landing page's failures list shows a failed build's reason as text too.
    registry.get("/v2/condery-no-such-package/manifests/latest")
    browser.get(registry.url + "/")
    assert "condery-no-such-package" in text_of(browser, "#failures")


async def test_builds_in_progress_are_listed(make_service, gated: GatedChannel) -> None:
    service = await make_service(max_concurrent_builds=1)

    def pull(name: str, client: str):
        return asyncio.ensure_future(service.resolve(parse_name(name, service.meta_packages), Latest(), client))

    first = pull("condery-hello", "a")
    await until(lambda: gated.package_requests("condery-hello"))  # holds the only slot
    second = pull("condery-empty", "b")
    await until(lambda: service.builds.queued == 1)
    page = landing_page(service, "registry.example", "")
    assert "1 building (of 1), 1 queued" in page
    assert '<a href="/images/condery-hello/latest"><code>condery-hello</code></a></td><td>latest</td><td>building' in page
    assert '<code>condery-empty</code></a></td><td>latest</td><td>queued' in page
    # With their progress (packages solved, bytes of them done) and their builds API status.
    hello = next(s for s in service.outcomes.builds.listing() if s.name == "condery-hello")
    assert f"<td>0 of {hello.packages_total}</td>" in page and hello.packages_total > 0
    assert f'href="/api/v1/builds/{hello.id}"' in page
    gated.packages.set()
    await asyncio.gather(first, second)
    assert "No build in progress" in landing_page(service, "registry.example", "")


@pytest.fixture
async def page_with_base(tmp_path: Path, fixture_channel: Path):
    """The landing page, fetched over HTTP, of a service whose base_image is the one given."""
    states: list[AppState] = []

    async def fetch(base_image: str) -> str:
        config = load_config(
            None,
            environ={},
            channels=[str(fixture_channel)],
            base_image=base_image,
            storage={"backend": "filesystem", "path": str(tmp_path / "store")},
            package_cache=str(tmp_path / "pkgs"),
        )
        state = await AppState.open(config)
        states.append(state)
        app = web.Application()
        register(app, ImageService(state))
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/")
            assert response.status == 200
            return await response.text()

    yield fetch
    for state in states:
        await state.close()


async def test_an_oci_base_is_shown_without_the_servers_path(page_with_base, tmp_path: Path, base_layout: Path) -> None:
    private = tmp_path / "srv-private-layouts-q7zx"
    private.mkdir()
    (private / "debian").symlink_to(base_layout, target_is_directory=True)
    page = await page_with_base(f"oci:{private / 'debian'}:bookworm")
    assert "<dt>base image</dt><dd>the base image&#x27;s OCI layout, tag bookworm</dd>" in page
    assert "srv-private-layouts-q7zx" not in page and str(private) not in page and str(base_layout) not in page


@pytest.mark.parametrize(("base_image", "shown"), [
    ("registry.example/library/debian:bookworm", "registry.example/library/debian:bookworm"),
    ("https://alice:hunter2@registry.example/library/debian:bookworm", "https://registry.example/library/debian:bookworm"),
    ("alice:hunter2@registry.example/library/debian:bookworm", "registry.example/library/debian:bookworm"),
])
async def test_a_registry_base_is_shown_without_credentials(page_with_base, base_image: str, shown: str) -> None:
    page = await page_with_base(base_image)
    assert f"<dt>base image</dt><dd><code>{shown}</code></dd>" in page
    assert "hunter2" not in page and "alice" not in page


@pytest.mark.e2e
def test_push_an_environment_from_the_page(registry: Registry, browser, fixture_channel: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    text = f"name: from-the-page\nchannels: [{fixture_channel.name}]\ndependencies: [xz=5.2, tzdata]\n"
    browser.get(registry.url + "/")
    browser.find_element(By.CSS_SELECTOR, "#push-form textarea[name=text]").send_keys(text)
    browser.find_element(By.CSS_SELECTOR, "#push-form button").click()
    wait_for(browser, lambda d: text_of(d, "#pushed-name").startswith("env/"))
    name = text_of(browser, "#pushed-name")
    lines = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "code.copy")]
    assert lines[0] == f"docker pull {registry.host}/{name}:latest"
    # The same file uploaded (not pasted) is the same name, and the page of the name reads back.
    upload = tmp_path / "environment.yml"
    upload.write_text(text)
    browser.get(registry.url + "/")
    browser.find_element(By.CSS_SELECTOR, "#push-form input[type=file]").send_keys(str(upload))
    browser.find_element(By.CSS_SELECTOR, "#push-form button").click()
    wait_for(browser, lambda d: text_of(d, "#pushed-name") == name)
    browser.get(registry.url + f"/images/{name}/latest")
    wait_for(browser, lambda d: "xz" in text_of(d, "table.packages"))
    assert "environment.yml" in text_of(browser, "#read-back")

    # A bad file is the registry's error, shown as text, and nothing else.
    browser.get(registry.url + "/")
    browser.find_element(By.CSS_SELECTOR, "#push-form textarea[name=text]").send_keys(
        "dependencies: [python]\nbuild: <script>window.pwned=1</script>\n")
    browser.find_element(By.CSS_SELECTOR, "#push-form button").click()
    wait_for(browser, lambda d: "unknown key 'build'" in text_of(d, "#error"))
    assert "line 2" in text_of(browser, "#error")
    not_pwned(browser)
