"""The OCI specs, written once: the grammars of digests, tags and repository names
(grammar), the distribution spec's errors (errors), media types, platforms, manifests and
configs as pure functions (manifest), what a document references and which child of an
index is a platform's (references: the one walker), and OCI image layouts read and
written (layout). No I/O beyond a layout's own files; nothing of conda."""
