"""Gallery RPCs (AddExemplars, RemoveExemplars, ListExemplars, SearchSimilar, AddSpecies).

Mixed into ``SpeciesIdentifierServicer``; implemented with the gallery.
"""

from __future__ import annotations


class CurationServicer:
    """Until the gallery is wired in, the generated base answers UNIMPLEMENTED."""
