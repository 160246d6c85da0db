"""Group layers by concatenation (condery/layers/concat.py): the layers' directories written
once, their other members' compressed bytes copied, one end member appended; the same tar
as the recompressing tarball.concat_layers and as stacking the layers; read whole by
Python, GNU gzip, zstd, and Go's readers in skopeo and umoci. Package layers share their
parents (`opt/conda/`...): the group holds each once, as podman requires (it refuses a
path twice in one layer: tests/test_e2e_groups.py pulls a group). Layers that share a
file are recompressed, the last one winning as stacking does."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

from condery.build.image_layers import _concat
from condery.layers import PackageError, concat
from condery.layers.compression import GZIP, ZSTD, open_decompressed
from condery.layers.concat import NotConcatenable, compress_part, concat_compressed, worth_concatenating
from condery.layers.tarball import OwnedDir, concat_layers, write_layer
from tests.fixtures.clients import run_tool, umoci_unpack


def layer(tmp: Path, name: str, files: dict[str, bytes], compression: str = GZIP, links: dict[str, str] = {},
          prefix: str = "opt/conda") -> Path:
    root = tmp / name
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    for rel, target in links.items():
        os.link(root / target, root / rel)
    return write_layer(root, prefix, tmp / f"{name}.layer", compression=compression).path


def noise(n: int, seed: int = 0) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest() for i in range(n // 32))


def tar_of(path: Path) -> bytes:
    with open(path, "rb") as handle, open_decompressed(handle) as stream:
        return stream.read()


def unpacked(path: Path) -> dict[str, tuple[str, bytes | str]]:
    """What applying the layer gives: the last entry of each path wins."""
    out: dict[str, tuple[str, bytes | str]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_of(path)), mode="r|") as tar:
        for m in tar:
            if m.isreg():
                out[m.name] = ("file", tar.extractfile(m).read())  # type: ignore[union-attr]
            elif m.isdir():
                out[m.name] = ("dir", b"")
            else:
                out[m.name] = ("link" if m.issym() else "hardlink", m.linkname)
    return out


def parts(data: bytes, compression: str) -> list[bytes]:
    """A layer's gzip members (zstd frames), each as it is in the layer."""
    out = []
    while data:
        dobj = zlib.decompressobj(31) if compression == GZIP else zstandard.ZstdDecompressor().decompressobj()
        dobj.decompress(data)
        assert dobj.eof
        rest = dobj.unused_data
        out.append(data[:len(data) - len(rest)])
        data = rest
    return out


def three(tmp: Path, compression: str) -> list[Path]:
    """Three layers sharing their parent directories (opt/, opt/conda/, opt/conda/lib/), no file."""
    return [
        layer(tmp, "a", {"bin/a": b"A", "lib/big.so": noise(3 << 20)}, compression),
        layer(tmp, "b", {"bin/b": b"B", "lib/l": b"L" * 5000}, compression),
        layer(tmp, "c", {"share/doc.txt": b"text\n" * 100_000, "f": b"x" * 1000}, compression, {"g": "f"}),
    ]


def dirs_tar(tar: bytes) -> bytes:
    """The leading directory entries of a layer's tar."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r|") as archive:
        for member in archive:
            if not member.isdir():
                return tar[:member.offset]
    raise AssertionError("no other entry")


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_concatenation_is_stacking_without_recompressing(tmp_path: Path, compression: str) -> None:
    layers = three(tmp_path, compression)
    blob = concat_compressed(layers, tmp_path / "group", compression)
    data = blob.path.read_bytes()
    assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest() and blob.size == len(data)
    tar = tar_of(blob.path)
    assert blob.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert len(tar) % 10240 == 0 and tar.endswith(bytes(1024))
    # The directories of all three once, then each layer's other members as they are (not
    # its directories' member, not its end member), then one end member.
    head = dirs_tar(tar)
    with tarfile.open(fileobj=io.BytesIO(head + bytes(1024)), mode="r|") as archive:
        names = [m.name for m in archive]
    assert names == sorted(set(names)) and {"opt", "opt/conda", "opt/conda/bin", "opt/conda/lib"} <= set(names)
    copied = compress_part(head, compression) + b"".join(
        b"".join(parts(path.read_bytes(), compression)[1:-1]) for path in layers)
    assert data.startswith(copied)
    assert len(parts(data[len(copied):], compression)) == 1  # then one end member
    # The same tar as the recompressing concat: the same diff_id; the same files as stacking.
    merged = concat_layers(layers, tmp_path / "merged", compression)
    assert merged.diff_id == blob.diff_id
    assert unpacked(blob.path) == unpacked(merged.path)
    assert unpacked(blob.path)["opt/conda/g"] == ("hardlink", "opt/conda/f")
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r|") as archive:
        every = [m.name for m in archive]
    assert len(every) == len(set(every))  # one entry a path: what podman requires
    again = concat_compressed(layers, tmp_path / "again", compression)
    assert (again.digest, again.diff_id) == (blob.digest, blob.diff_id)
    # A store's open blob files do as well as paths.
    handles = [open(path, "rb") for path in layers]
    try:
        from_handles = concat_compressed(handles, tmp_path / "handles", compression)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.close()
    assert from_handles.digest == blob.digest


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
@pytest.mark.parametrize("read,piece", [(1 << 20, 4 << 20), (4096, 1000), (333, 97), (1 << 20, 512)])
def test_any_read_and_piece_size_gives_the_same_group(tmp_path: Path, compression: str, read: int, piece: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Members end inside a read, inside zlib's unconsumed tail, on a read's edge: the
    compressed bytes of each member are copied once, the group is the same."""
    layers = three(tmp_path, compression)
    reference = concat_compressed(layers, tmp_path / "reference", compression)
    monkeypatch.setattr(concat, "_READ", read)
    monkeypatch.setattr(concat, "_ZSTD_READ", read)
    monkeypatch.setattr(concat, "_MAX_PIECE", piece)
    monkeypatch.setattr(concat, "_LEADING_PIECE", min(piece, 16 << 10))
    blob = concat_compressed(layers, tmp_path / "group", compression)
    assert (blob.digest, blob.diff_id, blob.size) == (reference.digest, reference.diff_id, reference.size)
    assert blob.path.read_bytes() == reference.path.read_bytes()


def test_every_gzip_reader_takes_the_whole_group(tmp_path: Path) -> None:
    layers = three(tmp_path, GZIP)
    blob = concat_compressed(layers, tmp_path / "group.tgz")
    tar = gzip.decompress(blob.path.read_bytes())
    assert subprocess.run(["gzip", "-dc", str(blob.path)], capture_output=True, check=True).stdout == tar
    listing = subprocess.run(["tar", "-tzf", str(blob.path)], capture_output=True, text=True, check=True).stdout
    assert "opt/conda/share/doc.txt" in listing.split()  # past the first layer's entries


def test_layers_sharing_a_file_are_recompressed_into_one_entry_a_path(tmp_path: Path) -> None:
    """Two packages with one file (a clobber): not concatenated (podman refuses a path
    twice), recompressed with one entry a path, the last layer's."""
    layers = [layer(tmp_path, "a", {"bin/a": b"A", "share/x": b"old"}), layer(tmp_path, "b", {"share/x": b"new"})]
    with pytest.raises(NotConcatenable, match="two layers"):
        concat_compressed(layers, tmp_path / "group")
    assert not (tmp_path / "group").exists()
    group = _concat(layers, tmp_path / "group", GZIP)
    with tarfile.open(group.path) as tar:
        names = tar.getnames()
    assert len(names) == len(set(names)) and "opt/conda" in names
    assert unpacked(group.path)["opt/conda/share/x"] == ("file", b"new")


def test_directories_keep_their_owner(tmp_path: Path) -> None:
    """A group writes each directory once, with the owner and mode its first layer gives it."""
    owned = tmp_path / "owned.layer"
    (tmp_path / "empty").mkdir()
    write_layer(tmp_path / "empty", "", owned, owned_dirs=[OwnedDir("home/user", 1000, 100)])
    other = layer(tmp_path, "o", {"x": b"x"}, prefix="home/user")
    group = concat_compressed([owned, other], tmp_path / "group")
    with tarfile.open(group.path) as tar:
        home = tar.getmember("home/user")
        assert (home.uid, home.gid, home.mode) == (1000, 100, 0o755)
        assert tar.getnames().count("home/user") == 1


def test_conflicts_are_refused_as_before(tmp_path: Path) -> None:
    a = layer(tmp_path, "a", {"bin/a": b"A"})
    c = layer(tmp_path, "c", {"bin/a/inner": b"dir now"})
    with pytest.raises(PackageError, match="bin/a"):  # what builds a group: _concat
        _concat([a, c], tmp_path / "ac", GZIP)
    assert not (tmp_path / "ac").exists()
    linked = layer(tmp_path, "l", {"f": b"x"}, links={"g": "f"})
    replacing = layer(tmp_path, "r", {"f": b"z"})
    with pytest.raises(PackageError, match="another layer replaces"):
        _concat([linked, replacing], tmp_path / "lr", GZIP)


def test_a_layer_of_the_old_layout_is_recompressed(tmp_path: Path) -> None:
    """Layers written before the end member of their own (one gzip stream) are not cut."""
    old = tmp_path / "old.tgz"
    with tarfile.open(old, "w:gz") as tar:
        info = tarfile.TarInfo("opt/conda/x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(NotConcatenable):
        concat_compressed([old], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def oci_layout(path: Path, layer: Path, diff_id: str, compression: str) -> None:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    layer_digest, layer_size = put(layer.read_bytes())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_digest, config_size = put(config)
    media = "application/vnd.oci.image.layer.v1.tar+" + ("gzip" if compression == GZIP else "zstd")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": media, "digest": layer_digest, "size": layer_size}],
    }).encode()
    manifest_digest, manifest_size = put(manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "group"}}]}))


@pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")), reason="umoci and skopeo")
@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_umoci_and_skopeo_read_a_concatenated_group(tmp_path: Path, compression: str) -> None:
    layers = three(tmp_path, compression)
    blob = concat_compressed(layers, tmp_path / "group", compression)
    oci_layout(tmp_path / "oci", blob.path, blob.diff_id, compression)
    # skopeo recompresses the layer: Go's gzip (zstd) reader goes through the whole stream,
    # and the diff_id it computes must be the group's.
    other = "zstd" if compression == GZIP else "gzip"
    run_tool(["skopeo", "copy", "--dest-compress-format", other, "oci:" + str(tmp_path / "oci") + ":group",
              "oci:" + str(tmp_path / "copy") + ":group"])
    index = json.loads((tmp_path / "copy" / "index.json").read_text())
    manifest = json.loads((tmp_path / "copy" / "blobs" / "sha256" /
                           index["manifests"][0]["digest"].split(":")[1]).read_text())
    config = json.loads((tmp_path / "copy" / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1])
                        .read_text())
    assert config["rootfs"]["diff_ids"] == [blob.diff_id]
    copied = tmp_path / "copy" / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    dctx = zstandard.ZstdDecompressor()
    raw = copied.read_bytes()
    tar = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else dctx.stream_reader(io.BytesIO(raw)).read()
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == blob.diff_id
    # umoci unpacks it (Go's archive/tar over every member) as the layers stacked. Debian's
    # umoci 0.4.7 knows no zstd layers: for those, skopeo's gzip copy of the group.
    rootfs = umoci_unpack(tmp_path / ("oci" if compression == GZIP else "copy"), "group", tmp_path / "bundle")
    conda = rootfs / "opt/conda"
    assert (conda / "bin/b").read_bytes() == b"B" and (conda / "bin/a").read_bytes() == b"A"
    assert (conda / "share/doc.txt").read_bytes() == b"text\n" * 100_000
    assert (conda / "lib/big.so").stat().st_size == 3 << 20
    assert os.stat(conda / "g").st_ino == os.stat(conda / "f").st_ino
    assert (conda / "lib").stat().st_mode & 0o7777 == 0o755


def test_small_layers_are_recompressed_large_ones_concatenated(tmp_path: Path) -> None:
    """Tiny layers compress better together (one context): a group of them is recompressed,
    with the same tar (diff_id) the concatenation would have."""
    assert not worth_concatenating([10_000] * 200) and not worth_concatenating([])
    assert worth_concatenating([3 << 20, 5000, 2 << 20]) and worth_concatenating([200_000] * 200)
    small = [layer(tmp_path, f"s{i}", {f"share/s{i}.txt": f"text of package {i}\n".encode() * 300}) for i in range(20)]
    recompressed = _concat(small, tmp_path / "r", GZIP, concatenate=False)
    concatenated = concat_compressed(small, tmp_path / "c")
    assert recompressed.diff_id == concatenated.diff_id
    assert recompressed.size < concatenated.size


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_the_group_reads_its_layers_headers_as_tarfile_does(tmp_path: Path, compression: str) -> None:
    """concat._layer_entries (headers only, contents skipped) against tarfile, on layers of
    long names (PAX records), non-ASCII names, long link targets, hardlinks and symlinks."""
    deep = "/".join(f"directory-{i:02d}" for i in range(14))  # past ustar's 100 + 155 bytes
    root = tmp_path / "odd"
    files = {f"share/{deep}/file.txt": b"deep\n", "share/caf\u00e9/na\u00efve.txt": b"accents\n",
             "share/x" * 20 + ".bin": noise(70_000), "lib/plain": b"plain\n"}
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    os.symlink(f"../share/{deep}/file.txt", root / "lib/long-link")
    os.link(root / "lib/plain", root / f"share/{deep}/hard")
    path = write_layer(root, "opt/conda", tmp_path / "odd.layer", compression=compression).path
    with open(path, "rb") as handle:
        _, start = concat._leading_dirs(handle, compression)
        handle.seek(start)
        parts = concat._Parts(concat._pieces(handle, compression), concat._Null())
        walked = list(concat._layer_entries(parts))
        end = parts.entries_end
    expected = []
    with tarfile.open(fileobj=io.BytesIO(tar_of(path)), mode="r|") as tar:
        for member in tar:
            if not member.isdir():
                kind = "file" if member.isreg() else "symlink" if member.issym() else "hardlink"
                expected.append((member.name, kind, member.linkname))
        tar_end = tar.offset
    assert walked == expected and len(walked) == 6
    assert end == tar_end - len(dirs_tar(tar_of(path)))  # both count from the first other entry


def gnu_layer(path: Path, xattr: bool = False) -> str:
    """A layer as another tar writer might give it: GNU long names (or PAX records with an
    extended attribute), in layout v5's members (directories, other entries, end blocks).
    Its long name."""
    raw = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if xattr else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name in ("opt", "opt/conda", "opt/conda/share"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        dirs_end = raw.tell()
        long_name = "opt/conda/share/" + "n" * 150
        info = tarfile.TarInfo(long_name)
        info.size = 5
        if xattr:
            info.pax_headers = {"SCHILY.xattr.user.note": "x"}
        tar.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("opt/conda/share/link")
        link.type, link.linkname = tarfile.SYMTYPE, "n" * 150
        tar.addfile(link)
        entries_end = raw.tell()
    data = raw.getvalue()
    path.write_bytes(compress_part(data[:dirs_end], GZIP) + compress_part(data[dirs_end:entries_end], GZIP)
                     + compress_part(data[entries_end:], GZIP))
    return long_name


def test_gnu_long_names_concatenate_and_other_headers_recompress(tmp_path: Path) -> None:
    """GNU long names and link names (Rust's tar writes them) are read as tarfile reads
    them; a header the reader leaves to tarfile (an extended attribute) makes the group
    recompressed."""
    ordinary = layer(tmp_path, "a", {"bin/a": b"A" * 70_000})
    gnu = tmp_path / "gnu.layer"
    long_name = gnu_layer(gnu)
    blob = concat_compressed([ordinary, gnu], tmp_path / "group")
    assert unpacked(blob.path)[long_name] == ("file", b"hello")
    assert unpacked(blob.path)["opt/conda/share/link"] == ("link", "n" * 150)
    # concat_layers writes the entries anew (as condery writes them): the same files.
    assert unpacked(blob.path) == unpacked(concat_layers([ordinary, gnu], tmp_path / "merged").path)
    odd = tmp_path / "global.layer"
    gnu_layer(odd, xattr=True)
    with pytest.raises(NotConcatenable, match="SCHILY"):
        concat_compressed([ordinary, odd], tmp_path / "group2")
    recompressed = _concat([ordinary, odd], tmp_path / "group3", GZIP)
    assert unpacked(recompressed.path)[long_name] == ("file", b"hello")


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_recompressed_groups_read_by_either_reader_are_the_same(tmp_path: Path, compression: str) -> None:
    """tarball.concat_layers reads condery's layers with the lean tar reader, and with
    tarfile where that one declines: both give the same group, owners (a changeable
    environment's, in its layers' headers) and hardlinks included."""
    from condery.layers import tarball
    from condery.layers.tarball import TreeOwner

    layers = three(tmp_path, compression)
    root = tmp_path / "owned-tree"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "mine").write_bytes(b"the user's\n")
    owned = write_layer(root, "opt/conda", tmp_path / "owned.layer", compression=compression,
                        owner=TreeOwner("opt/conda", 1000, 100)).path
    sources = [*layers, owned]
    lean = tarball._concat_layers(sources, tmp_path / "lean", compression, lean=True)
    full = tarball._concat_layers(sources, tmp_path / "tarfile", compression, lean=False)
    assert lean.path.read_bytes() == full.path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(tar_of(lean.path)), mode="r|") as tar:
        mine = next(m for m in tar if m.name == "opt/conda/lib/mine")
        assert (mine.uid, mine.gid) == (1000, 100)
    assert unpacked(lean.path)["opt/conda/g"] == ("hardlink", "opt/conda/f")
