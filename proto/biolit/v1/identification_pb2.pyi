import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_CLASSIFIER: _ClassVar[Method]
    METHOD_CLASSIFIER_LOW: _ClassVar[Method]
    METHOD_PROTOTYPE: _ClassVar[Method]
    METHOD_ZERO_SHOT: _ClassVar[Method]
    METHOD_REJECTED: _ClassVar[Method]
    METHOD_TAXON: _ClassVar[Method]
    METHOD_FUSED: _ClassVar[Method]
    METHOD_OBSERVATION: _ClassVar[Method]

class Rank(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_UNSPECIFIED: _ClassVar[Rank]
    RANK_KINGDOM: _ClassVar[Rank]
    RANK_PHYLUM: _ClassVar[Rank]
    RANK_CLASS: _ClassVar[Rank]
    RANK_ORDER: _ClassVar[Rank]
    RANK_FAMILY: _ClassVar[Rank]
    RANK_GENUS: _ClassVar[Rank]
    RANK_SPECIES: _ClassVar[Rank]
    RANK_SUBSPECIES: _ClassVar[Rank]
    RANK_SPECIES_GROUP: _ClassVar[Rank]
METHOD_UNSPECIFIED: Method
METHOD_CLASSIFIER: Method
METHOD_CLASSIFIER_LOW: Method
METHOD_PROTOTYPE: Method
METHOD_ZERO_SHOT: Method
METHOD_REJECTED: Method
METHOD_TAXON: Method
METHOD_FUSED: Method
METHOD_OBSERVATION: Method
RANK_UNSPECIFIED: Rank
RANK_KINGDOM: Rank
RANK_PHYLUM: Rank
RANK_CLASS: Rank
RANK_ORDER: Rank
RANK_FAMILY: Rank
RANK_GENUS: Rank
RANK_SPECIES: Rank
RANK_SUBSPECIES: Rank
RANK_SPECIES_GROUP: Rank

class IdentifyRequest(_message.Message):
    __slots__ = ("image", "embedding", "top_k", "num_similar", "restrict_to", "include_thumbnails", "request_id", "location", "observed_on")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_SIMILAR_FIELD_NUMBER: _ClassVar[int]
    RESTRICT_TO_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ON_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    num_similar: int
    restrict_to: _containers.RepeatedScalarFieldContainer[str]
    include_thumbnails: bool
    request_id: str
    location: Location
    observed_on: str
    def __init__(self, image: _Optional[bytes] = ..., embedding: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., num_similar: _Optional[int] = ..., restrict_to: _Optional[_Iterable[str]] = ..., include_thumbnails: _Optional[bool] = ..., request_id: _Optional[str] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., observed_on: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("species", "confidence", "method", "rank", "taxon")
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TAXON_FIELD_NUMBER: _ClassVar[int]
    species: str
    confidence: float
    method: Method
    rank: Rank
    taxon: str
    def __init__(self, species: _Optional[str] = ..., confidence: _Optional[float] = ..., method: _Optional[_Union[Method, str]] = ..., rank: _Optional[_Union[Rank, str]] = ..., taxon: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("species", "score")
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    species: str
    score: float
    def __init__(self, species: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Taxon(_message.Message):
    __slots__ = ("rank", "name")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    rank: Rank
    name: str
    def __init__(self, rank: _Optional[_Union[Rank, str]] = ..., name: _Optional[str] = ...) -> None: ...

class VernacularName(_message.Message):
    __slots__ = ("name", "language")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    language: str
    def __init__(self, name: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class Taxonomy(_message.Message):
    __slots__ = ("lineage", "vernacular_names")
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    VERNACULAR_NAMES_FIELD_NUMBER: _ClassVar[int]
    lineage: _containers.RepeatedCompositeFieldContainer[Taxon]
    vernacular_names: _containers.RepeatedCompositeFieldContainer[VernacularName]
    def __init__(self, lineage: _Optional[_Iterable[_Union[Taxon, _Mapping]]] = ..., vernacular_names: _Optional[_Iterable[_Union[VernacularName, _Mapping]]] = ...) -> None: ...

class RankConfidence(_message.Message):
    __slots__ = ("rank", "taxon", "confidence")
    RANK_FIELD_NUMBER: _ClassVar[int]
    TAXON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    rank: Rank
    taxon: str
    confidence: float
    def __init__(self, rank: _Optional[_Union[Rank, str]] = ..., taxon: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class SimilarExemplar(_message.Message):
    __slots__ = ("exemplar_id", "species", "score", "source_uri", "thumbnail", "license", "contributor", "observation_id")
    EXEMPLAR_ID_FIELD_NUMBER: _ClassVar[int]
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    exemplar_id: int
    species: str
    score: float
    source_uri: str
    thumbnail: bytes
    license: str
    contributor: str
    observation_id: str
    def __init__(self, exemplar_id: _Optional[int] = ..., species: _Optional[str] = ..., score: _Optional[float] = ..., source_uri: _Optional[str] = ..., thumbnail: _Optional[bytes] = ..., license: _Optional[str] = ..., contributor: _Optional[str] = ..., observation_id: _Optional[str] = ...) -> None: ...

class Versions(_message.Message):
    __slots__ = ("model_id", "catalog_version", "bundle_id", "service_version", "gallery_version", "model_fingerprint", "prior_version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PRIOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    catalog_version: str
    bundle_id: str
    service_version: str
    gallery_version: int
    model_fingerprint: str
    prior_version: str
    def __init__(self, model_id: _Optional[str] = ..., catalog_version: _Optional[str] = ..., bundle_id: _Optional[str] = ..., service_version: _Optional[str] = ..., gallery_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., prior_version: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "embed_ms", "score_ms", "search_ms", "queue_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    embed_ms: float
    score_ms: float
    search_ms: float
    queue_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., embed_ms: _Optional[float] = ..., score_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("decision", "classifier_candidates", "prototype_candidates", "taxonomy", "similar", "versions", "timing", "request_id", "rank_confidences", "error", "prior")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPE_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_FIELD_NUMBER: _ClassVar[int]
    SIMILAR_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    classifier_candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    prototype_candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    taxonomy: Taxonomy
    similar: _containers.RepeatedCompositeFieldContainer[SimilarExemplar]
    versions: Versions
    timing: Timing
    request_id: str
    rank_confidences: _containers.RepeatedCompositeFieldContainer[RankConfidence]
    error: ItemError
    prior: PriorEvidence
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., classifier_candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., prototype_candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., taxonomy: _Optional[_Union[Taxonomy, _Mapping]] = ..., similar: _Optional[_Iterable[_Union[SimilarExemplar, _Mapping]]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., request_id: _Optional[str] = ..., rank_confidences: _Optional[_Iterable[_Union[RankConfidence, _Mapping]]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., prior: _Optional[_Union[PriorEvidence, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListSpeciesRequest(_message.Message):
    __slots__ = ("taxon",)
    TAXON_FIELD_NUMBER: _ClassVar[int]
    taxon: str
    def __init__(self, taxon: _Optional[str] = ...) -> None: ...

class Species(_message.Message):
    __slots__ = ("scientific_name", "rank", "taxonomy", "description", "in_classifier", "has_prototype", "has_text_prototype", "exemplar_count", "added_at_runtime", "gbif_match_type", "gbif_status", "gbif_usage_key", "has_visual_prototype")
    SCIENTIFIC_NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IN_CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    HAS_PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    HAS_TEXT_PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_COUNT_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    GBIF_MATCH_TYPE_FIELD_NUMBER: _ClassVar[int]
    GBIF_STATUS_FIELD_NUMBER: _ClassVar[int]
    GBIF_USAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    HAS_VISUAL_PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    scientific_name: str
    rank: Rank
    taxonomy: Taxonomy
    description: str
    in_classifier: bool
    has_prototype: bool
    has_text_prototype: bool
    exemplar_count: int
    added_at_runtime: bool
    gbif_match_type: str
    gbif_status: str
    gbif_usage_key: int
    has_visual_prototype: bool
    def __init__(self, scientific_name: _Optional[str] = ..., rank: _Optional[_Union[Rank, str]] = ..., taxonomy: _Optional[_Union[Taxonomy, _Mapping]] = ..., description: _Optional[str] = ..., in_classifier: _Optional[bool] = ..., has_prototype: _Optional[bool] = ..., has_text_prototype: _Optional[bool] = ..., exemplar_count: _Optional[int] = ..., added_at_runtime: _Optional[bool] = ..., gbif_match_type: _Optional[str] = ..., gbif_status: _Optional[str] = ..., gbif_usage_key: _Optional[int] = ..., has_visual_prototype: _Optional[bool] = ...) -> None: ...

class ListSpeciesResponse(_message.Message):
    __slots__ = ("species",)
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    species: _containers.RepeatedCompositeFieldContainer[Species]
    def __init__(self, species: _Optional[_Iterable[_Union[Species, _Mapping]]] = ...) -> None: ...

class GetSpeciesRequest(_message.Message):
    __slots__ = ("scientific_name",)
    SCIENTIFIC_NAME_FIELD_NUMBER: _ClassVar[int]
    scientific_name: str
    def __init__(self, scientific_name: _Optional[str] = ...) -> None: ...

class GetServiceInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("image_size", "resize_mode", "mean", "std", "exif_transpose")
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    EXIF_TRANSPOSE_FIELD_NUMBER: _ClassVar[int]
    image_size: int
    resize_mode: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    exif_transpose: bool
    def __init__(self, image_size: _Optional[int] = ..., resize_mode: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., exif_transpose: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_image_pixels", "max_batch_size", "max_batch_wait_ms", "max_queue_size", "max_top_k", "max_num_similar", "max_restrict_to", "max_observation_photos")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SIMILAR_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTRICT_TO_FIELD_NUMBER: _ClassVar[int]
    MAX_OBSERVATION_PHOTOS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_image_pixels: int
    max_batch_size: int
    max_batch_wait_ms: float
    max_queue_size: int
    max_top_k: int
    max_num_similar: int
    max_restrict_to: int
    max_observation_photos: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_batch_wait_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_num_similar: _Optional[int] = ..., max_restrict_to: _Optional[int] = ..., max_observation_photos: _Optional[int] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("classifier_high", "classifier_low", "prototype", "zero_shot", "temperature", "alpha", "answer")
    CLASSIFIER_HIGH_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_LOW_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    ZERO_SHOT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    classifier_high: float
    classifier_low: float
    prototype: float
    zero_shot: float
    temperature: float
    alpha: float
    answer: float
    def __init__(self, classifier_high: _Optional[float] = ..., classifier_low: _Optional[float] = ..., prototype: _Optional[float] = ..., zero_shot: _Optional[float] = ..., temperature: _Optional[float] = ..., alpha: _Optional[float] = ..., answer: _Optional[float] = ...) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("model_id", "embedding_dim", "preprocessing", "catalog_size", "gallery_size", "versions", "runtime", "precision", "mode", "thresholds", "limits", "gallery_backend")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    CATALOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    GALLERY_BACKEND_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    embedding_dim: int
    preprocessing: Preprocessing
    catalog_size: int
    gallery_size: int
    versions: Versions
    runtime: str
    precision: str
    mode: str
    thresholds: Thresholds
    limits: Limits
    gallery_backend: str
    def __init__(self, model_id: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., catalog_size: _Optional[int] = ..., gallery_size: _Optional[int] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., runtime: _Optional[str] = ..., precision: _Optional[str] = ..., mode: _Optional[str] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., gallery_backend: _Optional[str] = ...) -> None: ...

class AddExemplarRequest(_message.Message):
    __slots__ = ("species", "image", "embedding", "source_uri", "license", "observation_id", "contributor")
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    species: str
    image: bytes
    embedding: _containers.RepeatedScalarFieldContainer[float]
    source_uri: str
    license: str
    observation_id: str
    contributor: str
    def __init__(self, species: _Optional[str] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Iterable[float]] = ..., source_uri: _Optional[str] = ..., license: _Optional[str] = ..., observation_id: _Optional[str] = ..., contributor: _Optional[str] = ...) -> None: ...

class AddExemplarsResponse(_message.Message):
    __slots__ = ("exemplar_ids", "species_updated", "gallery_version")
    EXEMPLAR_IDS_FIELD_NUMBER: _ClassVar[int]
    SPECIES_UPDATED_FIELD_NUMBER: _ClassVar[int]
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    exemplar_ids: _containers.RepeatedScalarFieldContainer[int]
    species_updated: _containers.RepeatedScalarFieldContainer[str]
    gallery_version: int
    def __init__(self, exemplar_ids: _Optional[_Iterable[int]] = ..., species_updated: _Optional[_Iterable[str]] = ..., gallery_version: _Optional[int] = ...) -> None: ...

class RemoveExemplarsRequest(_message.Message):
    __slots__ = ("exemplar_ids",)
    EXEMPLAR_IDS_FIELD_NUMBER: _ClassVar[int]
    exemplar_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, exemplar_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveExemplarsResponse(_message.Message):
    __slots__ = ("removed_count", "species_updated", "gallery_version")
    REMOVED_COUNT_FIELD_NUMBER: _ClassVar[int]
    SPECIES_UPDATED_FIELD_NUMBER: _ClassVar[int]
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    removed_count: int
    species_updated: _containers.RepeatedScalarFieldContainer[str]
    gallery_version: int
    def __init__(self, removed_count: _Optional[int] = ..., species_updated: _Optional[_Iterable[str]] = ..., gallery_version: _Optional[int] = ...) -> None: ...

class Exemplar(_message.Message):
    __slots__ = ("exemplar_id", "species", "source_uri", "license", "observation_id", "contributor", "added_at", "thumbnail", "content_sha256")
    EXEMPLAR_ID_FIELD_NUMBER: _ClassVar[int]
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    exemplar_id: int
    species: str
    source_uri: str
    license: str
    observation_id: str
    contributor: str
    added_at: _timestamp_pb2.Timestamp
    thumbnail: bytes
    content_sha256: str
    def __init__(self, exemplar_id: _Optional[int] = ..., species: _Optional[str] = ..., source_uri: _Optional[str] = ..., license: _Optional[str] = ..., observation_id: _Optional[str] = ..., contributor: _Optional[str] = ..., added_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., thumbnail: _Optional[bytes] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class ListExemplarsRequest(_message.Message):
    __slots__ = ("species", "page_size", "page_token", "include_thumbnails")
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    species: str
    page_size: int
    page_token: str
    include_thumbnails: bool
    def __init__(self, species: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_thumbnails: _Optional[bool] = ...) -> None: ...

class ListExemplarsResponse(_message.Message):
    __slots__ = ("exemplars", "next_page_token", "total_count")
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    exemplars: _containers.RepeatedCompositeFieldContainer[Exemplar]
    next_page_token: str
    total_count: int
    def __init__(self, exemplars: _Optional[_Iterable[_Union[Exemplar, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_count: _Optional[int] = ...) -> None: ...

class SearchSimilarRequest(_message.Message):
    __slots__ = ("image", "embedding", "exemplar_id", "k", "species", "taxon", "include_thumbnails")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    TAXON_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding: _containers.RepeatedScalarFieldContainer[float]
    exemplar_id: int
    k: int
    species: str
    taxon: str
    include_thumbnails: bool
    def __init__(self, image: _Optional[bytes] = ..., embedding: _Optional[_Iterable[float]] = ..., exemplar_id: _Optional[int] = ..., k: _Optional[int] = ..., species: _Optional[str] = ..., taxon: _Optional[str] = ..., include_thumbnails: _Optional[bool] = ...) -> None: ...

class SearchSimilarResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SimilarExemplar]
    def __init__(self, results: _Optional[_Iterable[_Union[SimilarExemplar, _Mapping]]] = ...) -> None: ...

class AddSpeciesRequest(_message.Message):
    __slots__ = ("scientific_name", "vernacular_names", "description", "taxonomy")
    SCIENTIFIC_NAME_FIELD_NUMBER: _ClassVar[int]
    VERNACULAR_NAMES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_FIELD_NUMBER: _ClassVar[int]
    scientific_name: str
    vernacular_names: _containers.RepeatedCompositeFieldContainer[VernacularName]
    description: str
    taxonomy: Taxonomy
    def __init__(self, scientific_name: _Optional[str] = ..., vernacular_names: _Optional[_Iterable[_Union[VernacularName, _Mapping]]] = ..., description: _Optional[str] = ..., taxonomy: _Optional[_Union[Taxonomy, _Mapping]] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("latitude", "longitude", "uncertainty_m")
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_M_FIELD_NUMBER: _ClassVar[int]
    latitude: float
    longitude: float
    uncertainty_m: float
    def __init__(self, latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., uncertainty_m: _Optional[float] = ...) -> None: ...

class ObservationPhoto(_message.Message):
    __slots__ = ("image", "embedding")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, image: _Optional[bytes] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class IdentifyObservationRequest(_message.Message):
    __slots__ = ("photos", "location", "observed_on", "top_k", "num_similar", "restrict_to", "include_thumbnails", "request_id")
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ON_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_SIMILAR_FIELD_NUMBER: _ClassVar[int]
    RESTRICT_TO_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    photos: _containers.RepeatedCompositeFieldContainer[ObservationPhoto]
    location: Location
    observed_on: str
    top_k: int
    num_similar: int
    restrict_to: _containers.RepeatedScalarFieldContainer[str]
    include_thumbnails: bool
    request_id: str
    def __init__(self, photos: _Optional[_Iterable[_Union[ObservationPhoto, _Mapping]]] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., observed_on: _Optional[str] = ..., top_k: _Optional[int] = ..., num_similar: _Optional[int] = ..., restrict_to: _Optional[_Iterable[str]] = ..., include_thumbnails: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class PriorShift(_message.Message):
    __slots__ = ("species", "without_prior", "prior_factor", "with_prior", "rank_without_prior", "rank_with_prior")
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FACTOR_FIELD_NUMBER: _ClassVar[int]
    WITH_PRIOR_FIELD_NUMBER: _ClassVar[int]
    RANK_WITHOUT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    RANK_WITH_PRIOR_FIELD_NUMBER: _ClassVar[int]
    species: str
    without_prior: float
    prior_factor: float
    with_prior: float
    rank_without_prior: int
    rank_with_prior: int
    def __init__(self, species: _Optional[str] = ..., without_prior: _Optional[float] = ..., prior_factor: _Optional[float] = ..., with_prior: _Optional[float] = ..., rank_without_prior: _Optional[int] = ..., rank_with_prior: _Optional[int] = ...) -> None: ...

class PriorEvidence(_message.Message):
    __slots__ = ("applied", "used_location", "used_date", "weight", "answer_without_prior", "confidence_without_prior", "changed_answer", "shifts", "reason")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    USED_LOCATION_FIELD_NUMBER: _ClassVar[int]
    USED_DATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_WITHOUT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_WITHOUT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    CHANGED_ANSWER_FIELD_NUMBER: _ClassVar[int]
    SHIFTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    used_location: bool
    used_date: bool
    weight: float
    answer_without_prior: str
    confidence_without_prior: float
    changed_answer: bool
    shifts: _containers.RepeatedCompositeFieldContainer[PriorShift]
    reason: str
    def __init__(self, applied: _Optional[bool] = ..., used_location: _Optional[bool] = ..., used_date: _Optional[bool] = ..., weight: _Optional[float] = ..., answer_without_prior: _Optional[str] = ..., confidence_without_prior: _Optional[float] = ..., changed_answer: _Optional[bool] = ..., shifts: _Optional[_Iterable[_Union[PriorShift, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class PhotoEvidence(_message.Message):
    __slots__ = ("index", "top_species", "top_probability", "answer_probability", "agrees", "outlier_probability", "excluded")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_SPECIES_FIELD_NUMBER: _ClassVar[int]
    TOP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    AGREES_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    index: int
    top_species: str
    top_probability: float
    answer_probability: float
    agrees: bool
    outlier_probability: float
    excluded: bool
    def __init__(self, index: _Optional[int] = ..., top_species: _Optional[str] = ..., top_probability: _Optional[float] = ..., answer_probability: _Optional[float] = ..., agrees: _Optional[bool] = ..., outlier_probability: _Optional[float] = ..., excluded: _Optional[bool] = ...) -> None: ...

class ObservationEvidence(_message.Message):
    __slots__ = ("combiner", "photo_weight", "effective_photos", "photos", "prior", "answer_from_photos", "confidence_from_photos")
    COMBINER_FIELD_NUMBER: _ClassVar[int]
    PHOTO_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_PHOTOS_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FROM_PHOTOS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FROM_PHOTOS_FIELD_NUMBER: _ClassVar[int]
    combiner: str
    photo_weight: float
    effective_photos: float
    photos: _containers.RepeatedCompositeFieldContainer[PhotoEvidence]
    prior: PriorEvidence
    answer_from_photos: str
    confidence_from_photos: float
    def __init__(self, combiner: _Optional[str] = ..., photo_weight: _Optional[float] = ..., effective_photos: _Optional[float] = ..., photos: _Optional[_Iterable[_Union[PhotoEvidence, _Mapping]]] = ..., prior: _Optional[_Union[PriorEvidence, _Mapping]] = ..., answer_from_photos: _Optional[str] = ..., confidence_from_photos: _Optional[float] = ...) -> None: ...

class IdentifyObservationResponse(_message.Message):
    __slots__ = ("decision", "candidates", "taxonomy", "rank_confidences", "photos", "evidence", "versions", "timing", "request_id")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_FIELD_NUMBER: _ClassVar[int]
    RANK_CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    taxonomy: Taxonomy
    rank_confidences: _containers.RepeatedCompositeFieldContainer[RankConfidence]
    photos: _containers.RepeatedCompositeFieldContainer[IdentifyResponse]
    evidence: ObservationEvidence
    versions: Versions
    timing: Timing
    request_id: str
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., taxonomy: _Optional[_Union[Taxonomy, _Mapping]] = ..., rank_confidences: _Optional[_Iterable[_Union[RankConfidence, _Mapping]]] = ..., photos: _Optional[_Iterable[_Union[IdentifyResponse, _Mapping]]] = ..., evidence: _Optional[_Union[ObservationEvidence, _Mapping]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
