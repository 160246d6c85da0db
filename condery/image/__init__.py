"""What an image name means, without I/O: names and their grammar (names), tags and
references (tags), meta-packages and how they combine (meta), typed conda specs to a name
(compose)."""
