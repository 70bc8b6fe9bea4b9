"""A Darwin Core Archive from ``infer-csv --format dwc`` rows: occurrence core, meta.xml, eml.xml.

The archive is a zip of three files (Darwin Core text guide,
https://dwc.tdwg.org/text/):

* ``occurrence.txt``: the core, one occurrence per identified photo, UTF-8,
  tab-separated, one header line, the identification terms
  (``identificationVerificationStatus = PredictedByMachine``, ...) in the core;
* ``meta.xml``: which file is the core, its id column (``occurrenceID``) and the
  term IRI of every column;
* ``eml.xml``: the dataset's metadata (EML 2.1.1): title, publisher, licence, and
  a methods paragraph saying the identifications are a machine's.

Rows without a taxon (rejections: no ``scientificName``/``taxonRank``) are left
out and counted: an occurrence names what was seen (docs/darwin-core.md).
"""

from __future__ import annotations

import csv
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from xml.etree import ElementTree as ET

from biolit_id.server.grpc.darwin_core import (
    REQUIRED,
    TERMS,
    clean_value,
    term_iri,
)

CORE_FILE = "occurrence.txt"
OCCURRENCE_ROW_TYPE = "http://rs.tdwg.org/dwc/terms/Occurrence"
TEXT_NS = "http://rs.tdwg.org/dwc/text/"
EML_NS = "eml://ecoinformatics.org/eml-2.1.1"
DEFAULT_LICENSE = "http://creativecommons.org/licenses/by/4.0/legalcode"


class ArchiveError(ValueError):
    """An input that cannot become an archive; the message says why."""


@dataclass(frozen=True)
class Metadata:
    title: str = "BioLit photos identified by biolit-id"
    publisher: str = "BioLit"
    license: str = DEFAULT_LICENSE
    language: str = "en"


@dataclass(frozen=True)
class Written:
    path: Path
    occurrences: int
    left_out: int  # rows with no taxon (rejections)


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of an ``infer-csv --format dwc`` CSV; ArchiveError if it is not one."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [t for t in REQUIRED if t not in (reader.fieldnames or [])]
        if missing:
            raise ArchiveError(f"{csv_path} is not a Darwin Core CSV from `infer-csv --format "
                               f"dwc`: no column {', '.join(missing)}")
        return [{t: row.get(t) or "" for t in TERMS} for row in reader]


def meta_xml() -> bytes:
    ET.register_namespace("", TEXT_NS)
    archive = ET.Element(f"{{{TEXT_NS}}}archive", metadata="eml.xml")
    core = ET.SubElement(archive, f"{{{TEXT_NS}}}core", {
        "encoding": "UTF-8", "fieldsTerminatedBy": "\\t", "linesTerminatedBy": "\\n",
        "fieldsEnclosedBy": "", "ignoreHeaderLines": "1", "rowType": OCCURRENCE_ROW_TYPE})
    files = ET.SubElement(core, f"{{{TEXT_NS}}}files")
    ET.SubElement(files, f"{{{TEXT_NS}}}location").text = CORE_FILE
    ET.SubElement(core, f"{{{TEXT_NS}}}id", index="0")
    for index, term in enumerate(TERMS):
        ET.SubElement(core, f"{{{TEXT_NS}}}field", index=str(index), term=term_iri(term))
    return ET.tostring(archive, encoding="UTF-8", xml_declaration=True)


def eml_xml(meta: Metadata, references: Iterable[str], count: int) -> bytes:
    ET.register_namespace("eml", EML_NS)
    root = ET.Element(f"{{{EML_NS}}}eml", {
        "packageId": f"urn:uuid:{uuid.uuid4()}", "system": "biolit-id", "scope": "system",
        "{http://www.w3.org/XML/1998/namespace}lang": meta.language})
    dataset = ET.SubElement(root, "dataset")
    ET.SubElement(dataset, "title").text = meta.title
    for role in ("creator", "metadataProvider", "contact"):
        ET.SubElement(ET.SubElement(dataset, role), "organizationName").text = meta.publisher
    ET.SubElement(dataset, "pubDate").text = date.today().isoformat()
    ET.SubElement(dataset, "language").text = meta.language
    ET.SubElement(ET.SubElement(dataset, "abstract"), "para").text = (
        f"{count} occurrences from photos. Every identification is a machine's prediction "
        "(identificationVerificationStatus = PredictedByMachine), not checked by a person.")
    rights = ET.SubElement(ET.SubElement(dataset, "intellectualRights"), "para")
    rights.text = f"This work is licensed under {meta.license}."
    methods = ET.SubElement(ET.SubElement(dataset, "methods"), "methodStep")
    description = ET.SubElement(methods, "description")
    ET.SubElement(description, "para").text = (
        "Photos identified automatically by biolit-id (BioCLIP embeddings, calibrated "
        "decision); each record names the rank answered, its confidence and method "
        "(identificationRemarks) and the model, bundle and catalog "
        "(identificationReferences). Photos the service could not identify at any rank "
        "are not included.")
    for reference in sorted(set(references)):
        ET.SubElement(description, "para").text = f"Identified with: {reference}"
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def write_archive(rows: Iterable[dict[str, str]], out: Path, meta: Metadata = Metadata(),
                  id_prefix: str = "") -> Written:
    """The archive at ``out`` (a zip); ArchiveError on a row without a required term or on
    a repeated occurrenceID."""
    kept: list[dict[str, str]] = []
    left_out = 0
    seen: set[str] = set()
    for position, row in enumerate(rows):
        values = {t: clean_value(row.get(t, "")) for t in TERMS}
        if not values["scientificName"] or not values["taxonRank"]:
            left_out += 1
            continue
        if values["occurrenceID"]:
            values["occurrenceID"] = id_prefix + values["occurrenceID"]
        missing = [t for t in REQUIRED if not values[t]]
        if missing:
            raise ArchiveError(f"row {position + 1}: no {', '.join(missing)}")
        if values["occurrenceID"] in seen:
            raise ArchiveError(f"row {position + 1}: occurrenceID "
                               f"{values['occurrenceID']!r} repeated")
        seen.add(values["occurrenceID"])
        kept.append(values)
    lines = ["\t".join(TERMS)] + ["\t".join(r[t] for t in TERMS) for r in kept]
    core = ("\n".join(lines) + "\n").encode("utf-8")
    eml = eml_xml(meta, (r["identificationReferences"] for r in kept), len(kept))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CORE_FILE, core)
        archive.writestr("meta.xml", meta_xml())
        archive.writestr("eml.xml", eml)
    partial.replace(out)
    return Written(out, len(kept), left_out)
