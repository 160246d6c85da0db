"""Every kind of record condery keeps in the store: the one catalogue.

A record is a small JSON document under (kind, key). Code names a kind only through
these constants, so that what the store holds can be read off this page (and gc,
which must know every kind to sweep it, cannot miss a new one: ALL lists them).

    kind               key                                    record (schemas.py)
    images             <name>/_/<tag>/<fingerprint> (ImageKey) ImageRecord: the manifests a name and tag resolved to
    layers             <layout>/<sha256>/<inputs>, group/<h>  LayerEntry: one package's (or group's) layer
    tags               <name>                                 TagsIndex: the tags a name has images for
    served             <image key>                            {"ref"}: the image was served (gc keeps it)
    replaced           <image key>/<old manifest hex>         {"ref", "replaced_at"}: what a rewrite replaced
    manifest-types     <manifest hex>                         {"media_type"}: for GETs by digest
    base-images        <platform>/<sha256 of the source>      a BaseImage as imported (bases/resolve.py)
    base-gzip-layers   <source layer hex>                     the descriptor of a layer's gzip recompression
    environments       <environment id>                       a pushed environment file, normalized (image/environment.py)
"""

IMAGES = "images"
LAYERS = "layers"
TAGS = "tags"
SERVED = "served"
REPLACED = "replaced"
MANIFEST_TYPES = "manifest-types"
BASE_IMAGES = "base-images"
BASE_GZIP_LAYERS = "base-gzip-layers"
ENVIRONMENTS = "environments"

ALL = (IMAGES, LAYERS, TAGS, SERVED, REPLACED, MANIFEST_TYPES, BASE_IMAGES, BASE_GZIP_LAYERS, ENVIRONMENTS)
# Records named by the hex digest of the blob they describe: live exactly when their blob is.
BY_BLOB = (MANIFEST_TYPES,)
# Records that name configs and layers (not manifests) gc must keep: bases are few, and
# every build starts from them.
OF_BASES = (BASE_IMAGES, BASE_GZIP_LAYERS)


def digest_key(digest: str) -> str:
    """The key of a record named by a blob's digest (`sha256:<hex>` -> `<hex>`)."""
    return digest.split(":", 1)[-1]
