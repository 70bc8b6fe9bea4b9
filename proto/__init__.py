"""The wire contract: generated stubs of ``biolit/v1/identification.proto``."""

from .biolit.v1 import identification_pb2, identification_pb2_grpc

__all__ = ["identification_pb2", "identification_pb2_grpc"]
