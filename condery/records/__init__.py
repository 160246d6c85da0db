"""The store's schema has one owner: every record kind (kinds), the keys and what they
cover with the one parser of image keys (keys), the records' schemas (schemas), when a
record answers (freshness), the record cache that checks a record's blobs before it
trusts it (cache), and gc on top of them (gc)."""
