"""The HTTP server only: the OCI pull API (server), connection limits and timeouts
(connections), content negotiation (negotiation), the images and builds APIs, the landing
page, health and metrics endpoints and the request log. It talks to the builder through
one Protocol (builder.Builder) and knows nothing of package internals."""
