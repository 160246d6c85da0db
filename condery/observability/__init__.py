"""Seeing what condery does: log lines (logs), Prometheus metrics (metrics) and the
report of each image build (build_report). The HTTP endpoints are in
condery/registry/health.py and the request log in condery/registry/access_log.py."""
