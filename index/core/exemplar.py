"""The metadata a reference photo carries from AddExemplars to every reply that shows it.

One frozen type so the fields are named once: store rows, new exemplars and
similar-photo hits extend it (keyword-only fields, so subclasses keep their own
positional ones), and code that copies metadata between a request, a row, a
hit and a reply goes through ``ExemplarMeta.of`` / ``meta_dict`` instead of
listing the fields again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True, kw_only=True)
class ExemplarMeta:
    """Where a photo comes from and under which terms it may be shown."""

    source_uri: str = ""
    observation_id: str = ""
    license: str = ""
    contributor: str = ""

    @classmethod
    def of(cls, source: object) -> ExemplarMeta:
        """The metadata of anything with these attributes (a request, a row, a hit)."""
        return cls(**{name: str(getattr(source, name, "") or "") for name in META_FIELDS})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> ExemplarMeta:
        """From a dict-like row (CSV, Parquet, Milvus); missing or None values are ""."""
        return cls(**{name: str(mapping.get(name) or "") for name in META_FIELDS})

    def meta(self) -> ExemplarMeta:
        """The metadata alone, without a subclass's other fields."""
        return ExemplarMeta(**self.meta_dict())

    def meta_dict(self) -> dict[str, str]:
        """``{field: value}``, to pass on as keyword arguments (protobuf messages too)."""
        return {name: getattr(self, name) for name in META_FIELDS}


META_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ExemplarMeta))
