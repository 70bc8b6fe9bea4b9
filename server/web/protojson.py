"""Protobuf messages to and from HTTP: JSON bodies, form fields, query strings.

The JSON is the proto's canonical JSON mapping, written and read by
``google.protobuf.json_format``: lowerCamelCase names (the proto names are
accepted too), enums as their names, int64 as strings, bytes as base64.
Forms and query strings are the same fields as text values; a file part
fills a bytes field. The OpenAPI schemas are generated from the same
descriptors, so they cannot drift from the proto.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from biolit_id.index.core.errors import InvalidRequestError

_F = FieldDescriptor
_INTS = {_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32, _F.TYPE_UINT32, _F.TYPE_FIXED32}
_LONGS = {_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64, _F.TYPE_UINT64, _F.TYPE_FIXED64}
_FLOATS = {_F.TYPE_FLOAT, _F.TYPE_DOUBLE}
_TRUE = {"true", "1", "on", "yes"}
_FALSE = {"false", "0", "off", "no", ""}


def to_json(message: Message) -> dict[str, Any]:
    """The message as proto JSON, scalar fields printed even when at their default."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def from_json(value: Any, message_cls: type[Message]) -> Message:
    """Parse a JSON object into ``message_cls``; a clear INVALID_ARGUMENT otherwise."""
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"the JSON body must be an object shaped like {message_cls.DESCRIPTOR.name}")
    try:
        return json_format.ParseDict(value, message_cls())
    except json_format.ParseError as exc:
        raise InvalidRequestError(f"bad JSON for {message_cls.DESCRIPTOR.name}: {exc}") from None


def field_named(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON name."""
    return descriptor.fields_by_name.get(name) or next(
        (f for f in descriptor.fields if f.json_name == name), None)


def from_fields(items: Iterable[tuple[str, str | bytes]], message_cls: type[Message],
                fixed: dict[str, Any] | None = None) -> Message:
    """A message from form or query fields: ``(name, text)`` pairs, bytes for file parts.

    Repeated fields take every value given for their name; booleans accept
    true/false/1/0/on/off. Unknown names are refused, as in JSON.
    """
    descriptor = message_cls.DESCRIPTOR
    message = message_cls()
    values: dict[str, list[str | bytes]] = {}
    for name, value in items:
        field = field_named(descriptor, name)
        if field is None:
            raise InvalidRequestError(f"{descriptor.name} has no field {name!r}")
        values.setdefault(field.name, []).append(value)
    for name, given in values.items():
        field = descriptor.fields_by_name[name]
        repeated = _is_repeated(field)
        if not repeated and len(given) > 1:
            raise InvalidRequestError(f"{field.json_name} is given {len(given)} times")
        if field.type == _F.TYPE_BYTES:
            if repeated:
                raise InvalidRequestError(f"{field.json_name}: repeated bytes are not supported")
            data = given[0]
            setattr(message, name, data if isinstance(data, bytes) else data.encode())
            continue
        texts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in given]
        if field.type == _F.TYPE_MESSAGE:
            raise InvalidRequestError(f"{field.json_name} needs a JSON body")
        if field.type == _F.TYPE_FLOAT or field.type == _F.TYPE_DOUBLE:
            # "0.1,0.2,..." in one field is the practical form for an embedding.
            texts = [part for text in texts for part in text.split(",") if part.strip()]
        converted = [_scalar(field, t) for t in texts]
        try:
            if repeated:
                getattr(message, name).extend(converted)
            else:
                setattr(message, name, converted[0])
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{field.json_name}: {exc}") from None
    for name, value in (fixed or {}).items():
        field = descriptor.fields_by_name[name]
        if _is_repeated(field):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def _scalar(field: FieldDescriptor, text: str) -> Any:
    text = text.strip()
    try:
        if field.type == _F.TYPE_BOOL:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        if field.type in _INTS or field.type in _LONGS:
            return int(text)
        if field.type in _FLOATS:
            return float(text)
        if field.type == _F.TYPE_ENUM:
            value = field.enum_type.values_by_name.get(text)
            return value.number if value is not None else int(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{field.json_name}: {exc}") from None
    return text


def _is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == _F.LABEL_REPEATED


# ------------------------------------------------------------------- OpenAPI


def json_schemas(roots: Iterable[Descriptor]) -> dict[str, dict[str, Any]]:
    """JSON Schemas (OpenAPI components) for ``roots`` and every type they use."""
    schemas: dict[str, dict[str, Any]] = {}
    pending = list(roots)
    while pending:
        descriptor = pending.pop()
        if descriptor.name in schemas:
            continue
        properties: dict[str, Any] = {}
        for field in descriptor.fields:
            schema, used = _field_schema(field)
            if used is not None and used.name not in schemas:
                pending.append(used)
            properties[field.json_name] = schema
        schemas[descriptor.name] = {"type": "object", "properties": properties}
    return schemas


def _field_schema(field: FieldDescriptor) -> tuple[dict[str, Any], Descriptor | None]:
    used = None
    if field.type == _F.TYPE_MESSAGE:
        used = field.message_type
        if used.full_name == "google.protobuf.Timestamp":
            schema: dict[str, Any] = {"type": "string", "format": "date-time"}
            used = None
        else:
            schema = {"$ref": f"#/components/schemas/{used.name}"}
    elif field.type == _F.TYPE_ENUM:
        schema = {"type": "string", "enum": _enum_names(field.enum_type)}
    elif field.type == _F.TYPE_BOOL:
        schema = {"type": "boolean"}
    elif field.type in _INTS:
        schema = {"type": "integer", "format": "int32"}
    elif field.type in _LONGS:
        schema = {"type": "string", "format": "int64"}
    elif field.type in _FLOATS:
        schema = {"type": "number"}
    elif field.type == _F.TYPE_BYTES:
        schema = {"type": "string", "format": "byte"}
    else:
        schema = {"type": "string"}
    if _is_repeated(field):
        schema = {"type": "array", "items": schema}
    return schema, used


def _enum_names(enum: EnumDescriptor) -> list[str]:
    return [v.name for v in enum.values]


def query_parameters(descriptor: Descriptor, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """OpenAPI query parameters for a request message's scalar fields."""
    skipped = set(skip)
    params = []
    for field in descriptor.fields:
        if field.name in skipped or field.type in (_F.TYPE_MESSAGE, _F.TYPE_BYTES):
            continue
        schema, _ = _field_schema(field)
        params.append({"name": field.json_name, "in": "query", "required": False,
                       "schema": schema})
    return params
