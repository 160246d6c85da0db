"""Small helpers every side of condery uses, importing nothing else of it: one reader
for untrusted JSON objects (jsonobject), credentials out of text (redact), one flight
per key (singleflight), child processes that die with the server (children)."""
