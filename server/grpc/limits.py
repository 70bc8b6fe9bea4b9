"""Size limits on request fields, checked before any work is done.

The message-size cap (``grpc.max_receive_message_length``) bounds a request as
a whole; these bound its parts, so that a 10-MB "species name" is refused with
a clear INVALID_ARGUMENT instead of travelling through the catalog, the SQLite
store and back out in an error message. One walk over the protobuf descriptor
covers every request type, including ones added to the proto later.

Gallery code should use these constants for its own checks, so that a limit
is defined once (``MAX_NAME_LENGTH`` lives with the catalog, which checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.server.catalog.catalog import (
    MAX_NAME_LENGTH,  # scientific names, taxa, vernacular names
)

# Free-text metadata: source URI, licence, contributor, observation id,
# request id, page token.
MAX_METADATA_LENGTH = 2048
# A species description (AddSpecies): a paragraph or two.
MAX_DESCRIPTION_LENGTH = 8192
# Any repeated field of names, ids or sub-messages.
MAX_LIST_LENGTH = 1000
# Floats in a client embedding; the exact model dimension is checked later.
MAX_EMBEDDING_VALUES = 4096
# Photos in one IdentifyObservation (ServerConfig.extra["max_observation_photos"] overrides).
MAX_OBSERVATION_PHOTOS = 8

NAME_FIELDS = frozenset({"species", "scientific_name", "taxon", "restrict_to", "name", "language"})
TEXT_FIELDS = frozenset({"description"})

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_FLOATS = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})


class RequestLimitError(InvalidRequestError):
    """A field is over its limit: INVALID_ARGUMENT, the message names the field."""


def string_limit(field_name: str) -> int:
    if field_name in NAME_FIELDS:
        return MAX_NAME_LENGTH
    if field_name in TEXT_FIELDS:
        return MAX_DESCRIPTION_LENGTH
    return MAX_METADATA_LENGTH


def check_request(message: Message, path: str = "") -> None:
    """Raise RequestLimitError for the first field over its limit.

    Bytes fields (photos) are not read: materialising them would copy up to
    the message cap, and the pixel budget bounds what decoding them costs.
    """
    for field in message.DESCRIPTOR.fields:
        name = f"{path}{field.name}"
        if _is_repeated(field):
            values = getattr(message, field.name)
            count = len(values)
            cap = MAX_EMBEDDING_VALUES if field.type in _FLOATS else MAX_LIST_LENGTH
            if count > cap:
                raise RequestLimitError(f"{name} has {count} entries, at most {cap} allowed")
            if field.type == _STRING:
                limit = string_limit(field.name)
                for i, value in enumerate(values):
                    _check_string(f"{name}[{i}]", value, limit)
            elif field.type == _MESSAGE:
                for i, value in enumerate(values):
                    check_request(value, f"{name}[{i}].")
        elif field.type == _STRING:
            _check_string(name, getattr(message, field.name), string_limit(field.name))
        elif field.type == _MESSAGE and message.HasField(field.name):
            check_request(getattr(message, field.name), f"{name}.")


def _is_repeated(field: FieldDescriptor) -> bool:
    # ``is_repeated`` is the modern spelling; ``label`` is deprecated in protobuf 6+.
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _check_string(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise RequestLimitError(
            f"{name} is {len(value)} characters long, at most {limit} allowed"
        )
    if "\x00" in value:
        # NUL bytes truncate C strings in logs and some drivers; no legitimate
        # name or URI contains one.
        raise RequestLimitError(f"{name} contains a NUL character")


# ------------------------------------------------------------------ interceptor

# Methods whose servicer checks each request itself (``_identify_one``):
# IdentifyStream reports a bad item inside the stream (ItemError) instead of
# failing the call, and Identify shares that code, so checking it here too
# would walk every request twice.
PER_ITEM_METHODS = frozenset({"Identify", "IdentifyStream"})


def deadline_passed(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class GuardInterceptor(grpc.ServerInterceptor):
    """Drops calls whose deadline has passed and refuses over-limit fields.

    A call can wait in the gRPC thread pool's queue past its deadline when the
    server is saturated; its client has already been told DEADLINE_EXCEEDED,
    so decoding and embedding its photo would only steal time from calls that
    can still be answered.
    """

    def __init__(self, on_deadline_drop: Callable[[str], None] | None = None) -> None:
        self.on_deadline_drop = on_deadline_drop

    def intercept_service(self, continuation, handler_call_details):
        from biolit_id.server.grpc.auth import OPEN_SERVICES, split_method
        from biolit_id.server.grpc.observability import wrap_handler

        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        if service in OPEN_SERVICES:
            return handler
        check_items = method not in PER_ITEM_METHODS
        streaming_in = handler.request_streaming

        def admit(request, context) -> object:
            if deadline_passed(context):
                if self.on_deadline_drop is not None:
                    self.on_deadline_drop(method)
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              "deadline passed before the call started; not processed")
            if not check_items:
                return request
            if streaming_in:
                return _checked_stream(request, context)
            _check_or_abort(request, context)
            return request

        def wrap_unary(behavior):
            def guarded(request, context):
                return behavior(admit(request, context), context)
            return guarded

        def wrap_streaming(behavior):
            def guarded(request, context):
                yield from behavior(admit(request, context), context)
            return guarded

        return wrap_handler(handler, wrap_unary, wrap_streaming)


def _check_or_abort(request: Message, context) -> None:
    try:
        check_request(request)
    except RequestLimitError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _checked_stream(requests: Iterator[Message], context) -> Iterator[Message]:
    for index, request in enumerate(requests):
        try:
            check_request(request)
        except RequestLimitError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"message {index}: {exc}")
        yield request
