"""An answer as Darwin Core terms: the occurrence, its place and date, the machine's identification.

Translates protobuf answers (``IdentifyObservationResponse``, ``IdentifyResponse``,
or the ``Decision`` and ``Taxonomy`` that ``messages.decision_parts`` builds
from the pipeline's result) into one flat record of Darwin Core terms, so the
HTTP route (``POST /v1/identify-observation/dwc``), ``biolit-id infer-csv
--format dwc`` and ``biolit-id export-dwca`` write the same terms the same
way. It decides nothing. docs/darwin-core.md.

* ``scientificName``/``taxonRank``: the answer, at the rank answered. A species
  answer is the catalog's name (``Patella sp.`` becomes ``Patella`` at rank
  ``genus``, the catalog's spelling kept in ``verbatimIdentification``); a
  rank answer (``METHOD_TAXON``) is the taxon at its rank (``Patella``,
  ``genus``); a rejection has neither, and ``exportable`` is False: it is not
  an occurrence of any taxon, so archives leave it out (docs/darwin-core.md).
* ``kingdom`` … ``genus`` from the answer's lineage (down to its rank).
* ``taxonID`` from the catalog's GBIF match (``https://www.gbif.org/species/KEY``,
  ``nameAccordingTo`` = GBIF Backbone Taxonomy); the catalog has no TAXREF
  ``CD_NOM``, so none is written.
* ``identificationVerificationStatus`` = ``PredictedByMachine``;
  ``identificationReferences`` names the service, model (and its weights'
  fingerprint), bundle, catalog and prior; ``identificationRemarks`` the
  confidence, whether it is calibrated, and the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from biolit_id.proto import identification_pb2 as pb

DWC = "http://rs.tdwg.org/dwc/terms/"
PREDICTED_BY_MACHINE = "PredictedByMachine"
BASIS_OF_RECORD = "HumanObservation"  # a person took the photo; the machine only named it
IDENTIFIED_BY = "biolit-id (automated identification)"
GBIF_SPECIES = "https://www.gbif.org/species/"
GBIF_BACKBONE = "GBIF Backbone Taxonomy"

HIGHER_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")
# Every column of a record, in order (the archive's fields, the CSV's header).
TERMS: tuple[str, ...] = (
    "occurrenceID", "basisOfRecord", "occurrenceStatus", "associatedMedia",
    "eventDate", "decimalLatitude", "decimalLongitude", "geodeticDatum",
    "coordinateUncertaintyInMeters",
    "scientificName", "taxonRank", *HIGHER_RANKS, "verbatimIdentification",
    "taxonID", "nameAccordingTo",
    "identifiedBy", "dateIdentified", "identificationVerificationStatus",
    "identificationReferences", "identificationRemarks",
)
# Terms every exported record has a value for.
REQUIRED: tuple[str, ...] = (
    "occurrenceID", "basisOfRecord", "occurrenceStatus", "scientificName", "taxonRank",
    "identifiedBy", "dateIdentified", "identificationVerificationStatus",
    "identificationReferences", "identificationRemarks",
)

# Rank -> Darwin Core's taxonRank (GBIF's rank vocabulary).
PB_RANK_TERM: dict[int, str] = {
    pb.RANK_KINGDOM: "kingdom", pb.RANK_PHYLUM: "phylum", pb.RANK_CLASS: "class",
    pb.RANK_ORDER: "order", pb.RANK_FAMILY: "family", pb.RANK_GENUS: "genus",
    pb.RANK_SPECIES: "species", pb.RANK_SUBSPECIES: "subspecies",
    pb.RANK_SPECIES_GROUP: "speciesAggregate",
}
# What the confidence is under each method (identificationRemarks): calibrated or not, and what.
METHOD_MEANING: dict[int, tuple[bool, str]] = {
    pb.METHOD_CLASSIFIER: (True, "the trained head's probability, at or above its high "
                                 "threshold"),
    pb.METHOD_CLASSIFIER_LOW: (True, "the trained head's probability, between its low and "
                                     "high thresholds"),
    pb.METHOD_PROTOTYPE: (True, "the prototypes' probability of a rare species, above their "
                                "threshold"),
    pb.METHOD_ZERO_SHOT: (False, "a softmax over the catalog's text prototypes, no trained "
                                 "bundle"),
    pb.METHOD_FUSED: (True, "one distribution over every species, above the bundle's cut"),
    pb.METHOD_TAXON: (True, "the probability mass of the taxon, its species being below their "
                            "thresholds"),
    pb.METHOD_OBSERVATION: (True, "the probability under the observation's photos and "
                                  "place-and-season prior combined"),
}


@dataclass(frozen=True)
class Event:
    """Where and when, as known (a request's location and observed_on, or a photo's EXIF)."""

    date: str = ""  # ISO 8601 date or date-time
    latitude: float | None = None
    longitude: float | None = None
    uncertainty_m: float = 0.0  # 0: unknown or precise

    @classmethod
    def of(cls, location: pb.Location | None, observed_on: str = "") -> Event:
        if location is None:
            return cls(date=observed_on)
        return cls(date=observed_on, latitude=location.latitude, longitude=location.longitude,
                   uncertainty_m=location.uncertainty_m)


@dataclass(frozen=True)
class Occurrence:
    """One record's terms, and whether it names a taxon (else archives leave it out)."""

    terms: dict[str, str]
    exportable: bool


def identification_references(versions: pb.Versions) -> str:
    """The service, model, weights, bundle, catalog and prior that answered."""
    parts = [f"biolit-id {versions.service_version}".strip(),
             f"model {versions.model_id} (weights fingerprint {versions.model_fingerprint})",
             f"bundle {versions.bundle_id}" if versions.bundle_id
             else "no bundle (zero-shot)",
             f"catalog {versions.catalog_version}"]
    if versions.prior_version:
        parts.append(f"place-and-season prior {versions.prior_version}")
    return "; ".join(parts)


def identification_remarks(decision: pb.Decision) -> str:
    """The confidence, whether it is calibrated, and the method."""
    method = pb.Method.Name(decision.method)
    if decision.method == pb.METHOD_REJECTED or (not decision.taxon and not decision.species):
        return f"not identified: nothing passed its threshold; method {method}"
    calibrated, meaning = METHOD_MEANING.get(decision.method, (False, ""))
    return (f"confidence {decision.confidence:.3f} "
            f"({'calibrated' if calibrated else 'uncalibrated'}); method {method}: {meaning}")


def _number(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _event_terms(event: Event) -> dict[str, str]:
    terms = {"eventDate": event.date}
    if event.latitude is not None and event.longitude is not None:
        terms.update(decimalLatitude=_number(event.latitude, 6),
                     decimalLongitude=_number(event.longitude, 6), geodeticDatum="WGS84")
        if event.uncertainty_m > 0:
            terms["coordinateUncertaintyInMeters"] = _number(event.uncertainty_m, 1)
    return terms


def _name_and_rank(decision: pb.Decision, species: pb.Species | None) -> tuple[str, str, str]:
    """(scientificName, taxonRank, verbatimIdentification) of the answer."""
    if decision.species:
        name = decision.species
        rank = species.rank if species is not None and species.rank else decision.rank
        for suffix in (" sp.", " spp."):  # a genus-level entry of the catalog
            if name.endswith(suffix):
                return name[: -len(suffix)], "genus", name
        return name, PB_RANK_TERM.get(rank, "species"), name
    if decision.taxon and decision.rank:
        return decision.taxon, PB_RANK_TERM.get(decision.rank, ""), decision.taxon
    return "", "", ""


def occurrence(decision: pb.Decision, taxonomy: pb.Taxonomy, versions: pb.Versions, *,
               species: pb.Species | None = None, event: Event = Event(),
               occurrence_id: str = "", media: str = "",
               identified_at: datetime | None = None) -> Occurrence:
    """The Darwin Core record of one answer (``species``: GetSpecies of the answered species,
    for its GBIF key and rank; ``event``: the observation's place and date)."""
    when = (identified_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    name, rank, verbatim = _name_and_rank(decision, species)
    terms = dict.fromkeys(TERMS, "")
    terms.update(
        occurrenceID=occurrence_id,
        basisOfRecord=BASIS_OF_RECORD,
        occurrenceStatus="present",
        associatedMedia=media,
        scientificName=name,
        taxonRank=rank,
        verbatimIdentification=verbatim,
        identifiedBy=IDENTIFIED_BY,
        dateIdentified=when.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        identificationVerificationStatus=PREDICTED_BY_MACHINE,
        identificationReferences=identification_references(versions),
        identificationRemarks=identification_remarks(decision),
    )
    terms.update(_event_terms(event))
    if name:
        for taxon in taxonomy.lineage:
            term = PB_RANK_TERM.get(taxon.rank, "")
            if term in HIGHER_RANKS:
                terms[term] = taxon.name
        if rank == "genus" and not terms["genus"]:
            terms["genus"] = name
        if decision.species and species is not None and species.gbif_usage_key:
            terms["taxonID"] = f"{GBIF_SPECIES}{species.gbif_usage_key}"
            terms["nameAccordingTo"] = GBIF_BACKBONE
    return Occurrence(terms=terms, exportable=bool(name and rank))


def observation_occurrence(request: pb.IdentifyObservationRequest,
                           response: pb.IdentifyObservationResponse,
                           species: pb.Species | None = None,
                           identified_at: datetime | None = None) -> Occurrence:
    """An observation's answer with its request's place and date; ``occurrenceID`` is the
    request's ``request_id`` (the caller's observation id)."""
    location = request.location if request.HasField("location") else None
    return occurrence(response.decision, response.taxonomy, response.versions,
                      species=species, event=Event.of(location, request.observed_on),
                      occurrence_id=request.request_id, identified_at=identified_at)


def clean_value(value: str) -> str:
    """A value fit for a tab-separated archive: no tab, newline or carriage return."""
    return " ".join(str(value).replace("\t", " ").splitlines()).strip()


def term_iri(term: str) -> str:
    """The term's IRI (every term here is Darwin Core's)."""
    return DWC + term
