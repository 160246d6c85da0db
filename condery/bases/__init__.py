"""The upstream side: base images resolved from a spec (resolve), imported and verified
into the store (imports), their untrusted manifests and configs checked (untrusted), the
registry client (upstream) and its credentials (auth)."""
