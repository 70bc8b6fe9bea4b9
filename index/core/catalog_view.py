"""What the gallery needs of the species catalog, and nothing more.

The catalog itself lives in the server (names, taxonomy, GBIF); the gallery
only checks names, persists runtime species as JSON and asks for a caption
for their text prototype. A protocol keeps the gallery free of server imports.
"""

from __future__ import annotations

from typing import Any, Protocol


class SpeciesRecordView(Protocol):
    scientific_name: str

    def to_json(self) -> dict[str, Any]: ...


class CatalogView(Protocol):
    def __contains__(self, name: object) -> bool: ...

    def add(self, record: Any) -> None: ...

    def record_from_json(self, data: dict[str, Any]) -> SpeciesRecordView: ...

    def prompt_for(self, name: str) -> str: ...
