"""The landing page at `/` and one page per image at `/images/<name>/<tag>`.

Server-rendered HTML, readable without JavaScript; `static/composer.js` only makes the
name composer live (it asks `/api/v1/compose` and `/api/v1/images/...`, so the grammar
is known in one place). Nothing is loaded from outside: an air-gapped registry's users
reach nothing else. Every value that comes from a request, a name, a package or the
configuration goes through `_e` (html.escape, quotes included) and channel URLs through
redact, so a package whose build string or channel holds `<script>` shows as text.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from condery.auth.http import CHANNELS_KEY, MAY_PULL_KEY
from condery.bases.resolve import describe_base
from condery.bases.upstream import ImageReference
from condery.build.look import ImageLook, shown_channels
from condery.common.redact import redact_text
from condery.image.compose import Composed, compose
from condery.image.environment import MAX_FILE_BYTES, EnvironmentFileError
from condery.oci.errors import ManifestInvalid, RegistryError, Unavailable
from condery.oci.layout import split_spec
from condery.registry.builder import Builder
from condery.registry.images_api import look
from condery.storage import StorageError

STATIC_DIR = Path(__file__).parent / "static"
_HTML = "text/html"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(name: str, tag: str = "latest") -> str:
    # Names are checked by the grammar before they reach a page, but a failure's name
    # may not be: quote it anyway.
    return "/images/" + quote(f"{name}/{tag}", safe="/")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _page(title: str, body: str, *, script: bool = False) -> str:
    js = '<script src="/static/composer.js" defer></script>' if script else ""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><link rel=\"stylesheet\" href=\"/static/condery.css\">{js}</head>"
        f"<body><header><a href=\"/\" class=\"brand\">condery</a></header><main>{body}</main></body></html>\n"
    )


def pull_lines(host: str, name: str, tag: str = "latest") -> list[tuple[str, str]]:
    """(where, line to copy) for an image: the ways users meet a registry name."""
    image = f"{host}/{name}:{tag}"
    return [
        ("docker", f"docker pull {image}"),
        ("podman", f"podman run --rm -it {image}"),
        ("JupyterHub (KubeSpawner profile)", f"image: {image}"),
        ("GitHub Actions job", f"container: {image}"),
    ]


def _lines_html(host: str, name: str, tag: str = "latest") -> str:
    rows = "".join(
        f"<dt>{_e(where)}</dt><dd><code class=\"copy\" data-kind=\"{_e(where.split()[0].lower())}\">{_e(line)}</code></dd>"
        for where, line in pull_lines(host, name, tag)
    )
    return f"<dl class=\"lines\">{rows}</dl>"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """A table; `rows` hold HTML already escaped by the caller."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table class=\"{_e(cls)}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- the landing page ---------------------------------------------------------------
def shown_base(spec: str) -> str:
    """The configured base image as the page names it: a registry reference as it is,
    credentials redacted; an `oci:` layout as errors name it, with its tag and never the
    server's path (`the base image's OCI layout, tag bookworm`)."""
    if spec.startswith("oci:"):
        _, tag = split_spec(spec[len("oci:") :])  # as the layout reader splits it
        return describe_base(spec) if tag is None else f"{describe_base(spec)}, tag {tag}"
    shown = redact_text(spec)
    try:
        ImageReference.parse(spec)
    except ValueError:
        # Not a reference: a `user:password@` before the host (which redact_text, made
        # for URLs, leaves) is cut.
        head, slash, rest = shown.partition("/")
        shown = head.rpartition("@")[2] + slash + rest
    return shown


def _served(service: Builder) -> str:
    config = service.config
    metas = _table(
        ("meta-package", "specs"),
        ((f"<code>{_e(name)}</code>", _e(", ".join(meta.specs))) for name, meta in sorted(config.meta_packages.items())),
        "meta",
    )
    channels = "".join(f"<li><code>{_e(c)}</code></li>" for c in shown_channels(config.channels))
    base = _e(shown_base(config.base_image))
    if not config.base_image.startswith("oci:"):  # a reference; a layout is named in words
        base = f"<code>{base}</code>"
    return (
        "<section id=\"served\"><h2>What this registry serves</h2><dl class=\"facts\">"
        f"<dt>channels</dt><dd><ul class=\"channels\">{channels}</ul></dd>"
        f"<dt>platforms</dt><dd>{_e(', '.join(config.platforms))}</dd>"
        f"<dt>base image</dt><dd>{base}</dd>"
        f"<dt>prefix</dt><dd><code>{_e(config.prefix)}</code></dd>"
        "<dt>tags</dt><dd><code>latest</code> (solved again after "
        f"{_e(config.latest_ttl)} s) and <code>YYYY-MM-DD</code> (the channels as they were that UTC day)</dd>"
        f"</dl><h3>Meta-packages</h3>{metas}</section>"
    )


def _composer(host: str, specs: str, composed: Composed | None) -> str:
    result = ""
    if composed is not None:
        problems = "".join(
            f"<li><code>{_e(spec)}</code>: {_e(reason)}</li>" for spec, reason in composed.problems
        )
        result = f"<ul class=\"problems\" id=\"problems\">{problems}</ul>"
        if composed.name:
            result += (
                f"<p>Image name: <a id=\"image-name\" href=\"{_e(_href(composed.name))}\">"
                f"<code>{_e(composed.name)}</code></a></p>{_lines_html(host, composed.name)}"
            )
    else:
        result = "<ul class=\"problems\" id=\"problems\"></ul>"
    return (
        "<section id=\"composer\"><h2>Compose an image name</h2>"
        "<p>One conda spec per line (<code>numpy&gt;=1.26</code>, <code>scipy 1.*</code>, "
        "<code>python=3.11</code>) or a meta-package name.</p>"
        "<form method=\"get\" action=\"/\" id=\"compose-form\">"
        f"<textarea name=\"specs\" id=\"specs\" rows=\"4\" cols=\"40\" spellcheck=\"false\">{_e(specs)}</textarea>"
        "<button type=\"submit\">Compose</button></form>"
        f"<div id=\"composed\" data-host=\"{_e(host)}\">{result}</div>"
        "<div id=\"solved\"></div></section>"
    )


def _builds(service: Builder, visible: Callable[[str], bool]) -> str:
    queue = service.builds
    rows = []
    for status in service.outcomes.builds.listing():
        if status.is_finished or not visible(status.name):
            continue
        packages = f"{status.packages_done} of {status.packages_total}" if status.packages_total else "solving"
        size = f"{_size(status.bytes_done)} of {_size(status.bytes_total)}" if status.bytes_total else ""
        rows.append((
            f"<a href=\"{_e(_href(status.name, status.tag))}\"><code>{_e(status.name)}</code></a>", _e(status.tag),
            _e(status.state), _e(packages), _e(size),
            f"<a href=\"/api/v1/builds/{_e(status.id)}\">status</a>",
        ))
    listing = (_table(("image", "tag", "state", "packages", "bytes", "API"), rows, "builds") if rows
               else "<p>No build in progress.</p>")
    return (
        "<section id=\"builds\"><h2>Builds in progress</h2>"
        f"<p>{queue.running} building (of {queue.max_running}), {queue.queued} queued "
        f"(of {queue.max_queued}), {queue.waiting} requests waiting.</p>{listing}</section>"
    )


def _failures(service: Builder, visible: Callable[[str], bool]) -> str:
    failures = [f for f in service.outcomes.recent_failures() if visible(f.name)]
    if not failures:
        return "<section id=\"failures\"><h2>Recent failures</h2><p>None since this process started.</p></section>"
    rows = (
        (
            _e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f.at))),
            f"<a href=\"{_e(_href(f.name, f.tag))}\"><code>{_e(f.name)}</code></a>:{_e(f.tag)}",
            _e(f.code),
            f"<span class=\"reason\">{_e(f.message)}</span>",
        )
        for f in failures
    )
    return f"<section id=\"failures\"><h2>Recent failures</h2>{_table(('when', 'image', 'code', 'reason'), rows, 'failures')}</section>"


def _environments(service: Builder, visible: Callable[[str], bool]) -> str:
    """Push a file (upload or paste), and the environments folder's names (those the reader
    may pull)."""
    form = (
        "<form method=\"post\" action=\"/environments\" enctype=\"multipart/form-data\" id=\"push-form\">"
        "<p><label>An <code>environment.yml</code>, a <code>conda-lock.yml</code> or an <code>@EXPLICIT</code> "
        "lock: <input type=\"file\" name=\"file\" accept=\".yml,.yaml,.txt,.lock\"></label></p>"
        "<p><label>or paste it:<br><textarea name=\"text\" rows=\"6\" cols=\"60\" spellcheck=\"false\">"
        "</textarea></label></p><button type=\"submit\">Push</button></form>"
    )
    named = [n for n in service.environments.listing() if visible(f"envs/{n.name}")]
    rows = (
        (f"<a href=\"{_e(_href('envs/' + n.name))}\"><code>envs/{_e(n.name)}</code></a>"
         if n.environment is not None else f"<code>envs/{_e(n.name)}</code>",
         f"<code>{_e(n.file)}</code>",
         _e(n.environment.display_name or "") if n.environment is not None
         else f"<span class=\"reason\">{_e(n.error)}</span>")
        for n in named
    )
    folder = (_table(("image", "file", "name or problem"), rows, "environments") if named
              else "<p>No environments folder is served (<code>environments_dir</code>).</p>"
              if service.config.environments_dir is None else "<p>The environments folder is empty.</p>")
    return (
        "<section id=\"environments\"><h2>Environments</h2>"
        "<p>Push an environment file and get an image name: the same file always gives the same name.</p>"
        f"{form}<h3>From the environments folder</h3>{folder}</section>"
    )


def pushed_page(host: str, name: str, kind: str) -> str:
    body = (
        f"<h1>Pushed: <code id=\"pushed-name\">{_e(name)}</code></h1>"
        f"<p>Read as {_e(kind)}. Pull it with any of these; the first pull builds it.</p>"
        f"{_lines_html(host, name)}<p><a href=\"{_e(_href(name))}\">What it solves to</a></p>"
    )
    return _page(f"{name} - condery", body)


def landing_page(service: Builder, host: str, specs: str, visible: Callable[[str], bool] = lambda name: True) -> str:
    """The landing page; `visible` says which names' builds and failures the reader may see
    (those it may pull, under auth)."""
    composed = compose(specs, service.meta_packages) if specs.strip() else None
    body = (
        f"<h1>condery at <code>{_e(host)}</code></h1>"
        "<p class=\"lead\">A container registry that builds conda images on demand: the image name is the "
        "list of packages. <code>docker pull " + _e(host) + "/numpy/scipy.gt.1.0</code> solves, builds one "
        "layer per package and serves the image.</p>"
        f"{_composer(host, specs, composed)}{_environments(service, visible)}{_served(service)}{_builds(service, visible)}"
        f"{_failures(service, visible)}"
    )
    return _page(f"condery at {host}", body, script=True)


# -- an image's page ----------------------------------------------------------------
def image_page(host: str, image: ImageLook) -> str:
    sections = [
        f"<h1>Image <code id=\"name\">{_e(image.name)}</code>:<code>{_e(image.tag)}</code></h1>",
        _lines_html(host, image.name, image.tag),
        "<p>Built: <code id=\"digest\">" + _e(image.digest) + "</code></p>" if image.digest
        else "<p id=\"not-built\">Not built yet: the first pull builds it (these are the packages it will hold).</p>",
    ]
    files = " ".join(
        f"<a href=\"/api/v1/images/{_e(quote(image.name, safe='/'))}/{_e(quote(image.tag))}/{f}\">{f}</a>"
        for f in ("environment.yml", "explicit.txt", "conda-lock.yml"))
    sections.append(f"<p id=\"read-back\">As a file: {files}</p>")
    if image.changeable:
        owner = image.changeable["owner"]
        tools = " and ".join(f"<code>{_e(t)}</code>" for t in image.changeable["package_managers"])
        sections.append(f"<p id=\"changeable\">Changeable: <code>{_e(image.changeable['prefix'])}</code> belongs "
                        f"to uid:gid <code>{_e(owner)}</code>, who may add packages with {tools} in a running "
                        "container.</p>")
    if image.kernels:
        rows = (
            (f"<code>{_e(k['name'])}</code>", _e(k["display_name"]), _e(k["language"] or "none (no kernel)"),
             f"<code>{_e(k['prefix'])}</code>")
            for k in image.kernels
        )
        sections.append(f"<section id=\"kernels\"><h2>Kernels ({len(image.kernels)})</h2>"
                        f"{_table(('kernel', 'display name', 'language', 'environment'), rows, 'kernels')}</section>")
    for subdir, reason in image.solved.skipped.items():
        sections.append(f"<p class=\"skipped\">Not served for {_e(subdir)}: {_e(reason)}</p>")
    for subdir, platform in image.solved.platforms.items():
        rows = (
            (f"<code>{_e(p.name)}</code>", _e(p.version), _e(p.build), _e(p.channel), _e(_size(p.size)))
            for p in platform.packages
        )
        sections.append(
            f"<section class=\"platform\"><h2>{_e(subdir)}: {len(platform.packages)} packages, "
            f"{_e(_size(platform.size))} to download</h2>"
            f"{_table(('package', 'version', 'build', 'channel', 'size'), rows, 'packages')}"
            f"<h3>Lock</h3><pre class=\"lock\">{_e(platform.lock)}</pre></section>"
        )
    if image.layers is not None:
        rows = (
            (_e(layer.platform), f"<code>{_e(layer.digest)}</code>", _e(_size(layer.size)),
             _e(" ".join(layer.packages) or "(base image)"))
            for layer in image.layers
        )
        total = sum(layer.size for layer in image.layers)
        sections.append(
            f"<section id=\"layers\"><h2>Layers ({len(image.layers)}, {_e(_size(total))} compressed)</h2>"
            f"{_table(('platform', 'digest', 'size', 'packages'), rows, 'layers')}</section>"
        )
    return _page(f"{image.name}:{image.tag} - condery", "".join(sections))


async def _form_file(request: web.Request) -> bytes:
    """The uploaded file, else the pasted text, of the push form; bounded like the API's body."""
    too_large = ManifestInvalid(f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
    if request.content_length is not None and request.content_length > 2 * MAX_FILE_BYTES + 65536:
        raise too_large
    if not request.content_type.startswith("multipart/"):
        raise ManifestInvalid("send the form (multipart/form-data) with a file or a pasted text")
    found: dict[str, bytes] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name not in ("file", "text") or part.name in found:
            raise ManifestInvalid("the form has a file and a text field, once each")
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            if len(data) > MAX_FILE_BYTES:
                raise too_large
        found[part.name] = bytes(data)
    chosen = found.get("file") or found.get("text", b"").replace(b"\r\n", b"\n")
    if not chosen.strip():
        raise ManifestInvalid("choose a file or paste one")
    return chosen


def error_page(error: RegistryError) -> web.Response:
    body = (
        f"<h1>{_e(error.status)} {_e(error.code)}</h1>"
        f"<p class=\"error\" id=\"error\">{_e(redact_text(error.message))}</p><p><a href=\"/\">Back</a></p>"
    )
    return web.Response(status=error.status, text=_page(f"{error.code} - condery", body), content_type=_HTML)


def register(app: web.Application, service: Builder) -> None:
    async def landing(request: web.Request) -> web.StreamResponse:
        page = landing_page(service, request.host, request.query.get("specs", ""),
                            request.get(MAY_PULL_KEY) or (lambda name: True))
        return web.Response(text=page, content_type=_HTML)

    async def image(request: web.Request) -> web.StreamResponse:
        try:
            found = await look(service, request.match_info["tail"], request.get(CHANNELS_KEY))
        except RegistryError as error:
            return error_page(error)
        return web.Response(text=image_page(request.host, found), content_type=_HTML)

    async def push(request: web.Request) -> web.StreamResponse:
        try:
            data = await _form_file(request)
            environment = await service.environments.push(data, request.remote or "unknown")
        except EnvironmentFileError as exc:
            return error_page(ManifestInvalid(f"not an environment file: {exc}"))
        except RegistryError as error:
            return error_page(error)
        except StorageError as exc:
            return error_page(Unavailable(f"cannot store the environment: {exc}"))
        page = pushed_page(request.host, f"env/{environment.id}", environment.kind)
        return web.Response(status=201, text=page, content_type=_HTML)

    app.router.add_get("/", landing)
    app.router.add_post("/environments", push)
    app.router.add_get("/images/{tail:.+}", image)
    app.router.add_static("/static/", STATIC_DIR)
