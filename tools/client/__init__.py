"""Clients of a running service: uploads, remote infer-csv, contact sheets."""
