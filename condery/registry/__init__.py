"""OCI and HTTP: names, tags, manifests, the pull API. Knows nothing of package internals."""
