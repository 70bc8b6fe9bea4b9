"""The gRPC side: servicers, interceptors (auth, errors, observability), limits, messages."""
