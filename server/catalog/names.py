"""The grammar of the scientific names the catalog accepts, checked where names enter.

A name that reaches the catalog travels on: into GBIF look-ups, text prompts,
the gallery's rows and every export (Darwin Core included). So a new name
(``AddSpecies``, over gRPC and HTTP alike) must be a name, not merely text:

* a binomial, ``Genus epithet`` (``Carcinus maenas``), optionally with a
  subgenus in parentheses (``Lepas (Anatifa) anatifera``);
* an infraspecific name, with or without its rank marker
  (``Haliotis tuberculata tuberculata``, ``Codium fragile subsp. fragile``;
  markers ``subsp.``, ``ssp.``, ``var.``, ``subvar.``, ``f.``, ``forma``);
* a genus-level entry, ``Genus sp.`` or ``Genus spp.`` (``Patella sp.``);
* a group photographers cannot tell apart: epithets joined by ``/`` within one
  genus (``Littorina fabalis/obtusata``) or whole names joined by `` / ``
  (``Magallana gigas / Ostrea edulis``);
* a hybrid, marked with ``×`` (``Genus × epithet``, ``× Genus epithet``).

A genus is a capital then lower-case Latin letters, an epithet lower-case
letters; either may hold one inner hyphen (``novae-zelandiae``). Authorship
(``(Linnaeus, 1758)``) is not part of the name: the catalog keeps it in its own
field. Identification qualifiers (``cf.``, ``aff.``) are not names either. A
name has at most ``MAX_SCIENTIFIC_NAME_LENGTH`` characters. Runs of spaces
become one; anything else is refused with the rule it broke
(``InvalidRequestError``: ``INVALID_ARGUMENT`` on both APIs).

Every name of the shipped catalog follows this grammar (tests/test_names.py).
Pure: no I/O, no server imports.
"""

from __future__ import annotations

import re
import unicodedata

from biolit_id.index.core.errors import InvalidRequestError

MAX_SCIENTIFIC_NAME_LENGTH = 120
MAX_TAXON_NAME_LENGTH = 80
HYBRID = "×"
RANK_MARKERS = ("subsp.", "ssp.", "var.", "subvar.", "f.", "forma")
ALLOWED = re.compile(r"[A-Za-z .()/\-×]")

_GENUS = r"[A-Z][a-z]+(?:-[a-z]+)?"
_EPITHET = r"[a-z]+(?:-[a-z]+)?"
_MARKER = "|".join(re.escape(m) for m in RANK_MARKERS)
_NAME = re.compile(
    rf"(?:× )?{_GENUS}"  # genus, maybe a hybrid genus
    rf"(?: \({_GENUS}\))?"  # subgenus
    rf"(?: spp?\."  # a genus-level entry: Patella sp.
    rf"| (?:× ?)?{_EPITHET}(?:/{_EPITHET})*"  # species epithet(s), a group with "/"
    rf"(?: (?:(?:{_MARKER}) )?(?:× ?)?{_EPITHET})?"  # infraspecific epithet
    rf")"
)
_UNINOMIAL = re.compile(_GENUS)
_AUTHOR_HINT = re.compile(r"\d|,|\([^)]*[ ,&][^)]*\)|\b(?:ex|in|et)\b")
_AUTHORSHIP = ("authorship (e.g. '(Linnaeus, 1758)') is not part of the name; the catalog "
               "keeps it in its own field")
_QUALIFIERS = re.compile(r"(?:^| )(?:cf|aff|nr|sp\. ?nov|indet)\.?(?: |$)")


def _refuse(field: str, value: str, rule: str) -> InvalidRequestError:
    shown = value if len(value) <= 60 else value[:57] + "..."
    return InvalidRequestError(f"{field} {shown!r} is not a scientific name: {rule}")


def _clean(value: str, field: str, max_length: int) -> str:
    """NFC, refusing control and format characters, with runs of spaces collapsed."""
    for char in value:
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidRequestError(
                f"{field} has a control or invisible character (U+{ord(char):04X}) at "
                f"position {value.index(char)}: a name is letters and spaces")
    text = " ".join(unicodedata.normalize("NFC", value).split())
    if not text:
        raise InvalidRequestError(f"{field} is required")
    if len(text) > max_length:
        raise InvalidRequestError(
            f"{field} has {len(text)} characters, more than the {max_length} a name may have")
    for char in text:
        if not ALLOWED.fullmatch(char):
            if char.isdigit() or char == ",":
                raise _refuse(field, text, _AUTHORSHIP)
            what = "markup" if char in "<>&\"'`=;{}" else "a character"
            raise _refuse(field, text, f"{what} {char!r} (U+{ord(char):04X}) cannot be part "
                                       "of a name; a name is Latin letters, spaces and . / ( ) "
                                       f"- {HYBRID} only")
    return text


def check_scientific_name(value: str, field: str = "scientific_name") -> str:
    """``value`` normalised (NFC, single spaces) if it follows the grammar of names.

    Raises ``InvalidRequestError`` naming the rule broken otherwise.
    """
    text = _clean(value, field, MAX_SCIENTIFIC_NAME_LENGTH)
    text = re.sub(r" ?/ ?(?=[A-Z×])", " / ", text)  # "A b/C d" is a group of names
    text = re.sub(r"(?<=[a-z]) / (?=[a-z])", "/", text)  # "fabalis / obtusata" -> one genus
    for part in text.split(" / "):
        if _NAME.fullmatch(part):
            continue
        raise _refuse(field, text, _why(part))
    return text


def check_taxon_name(value: str, field: str = "taxon", group: bool = False) -> str:
    """A rank's name: one capitalised word (``Gastropoda``); with ``group``, several
    joined by `` / `` (a genus-level group, ``Magallana / Ostrea``)."""
    text = _clean(value, field, MAX_TAXON_NAME_LENGTH)
    parts = [p.strip() for p in text.split("/")] if group else [text]
    for part in parts:
        if not _UNINOMIAL.fullmatch(part):
            raise _refuse(field, text, "a taxon above species is one word, a capital then "
                                       "lower-case letters (Gastropoda, Patella)"
                          + ("; a group joins such words with ' / '" if group else ""))
    return " / ".join(parts)


def _why(part: str) -> str:
    """The rule a name (one member of a group) breaks, for the error message."""
    words = part.split()
    if _QUALIFIERS.search(part):
        return "identification qualifiers (cf., aff., sp. nov.) are not part of a name"
    if _AUTHOR_HINT.search(part) or (len(words) > 2 and words[-1][:1].isupper()):
        return _AUTHORSHIP
    if len(words) == 1:
        return "one word names a genus or a higher taxon; a catalog entry is a species " \
               "('Genus epithet'), a subspecies, a group or 'Genus sp.'"
    if not _UNINOMIAL.fullmatch(words[0].lstrip(HYBRID)):
        return "a name starts with its genus: a capital then lower-case letters"
    return "expected 'Genus epithet', 'Genus epithet [subsp.|var.|f.] epithet', 'Genus sp.', " \
           "'Genus (Subgenus) epithet', 'Genus a/b' or 'Genus a / Other b'; epithets are " \
           "lower-case letters"
