"""Darwin Core out: ``infer-csv --format dwc`` rows and ``export-dwca`` archives.

The terms themselves come from ``biolit_id.server.grpc.darwin_core``, shared with the
HTTP route; here are the offline writers. docs/darwin-core.md.
"""
