"""An observation's answer as Darwin Core terms: ``POST /v1/identify-observation/dwc``.

The request is ``POST /v1/identify-observation``'s (JSON or form); the route
calls ``IdentifyObservation`` and, for a species answer, ``GetSpecies`` (its
GBIF key and rank) through the bridge, then ``grpc.darwin_core`` writes the
terms. docs/darwin-core.md, docs/http-api.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.grpc.darwin_core import observation_occurrence
from biolit_id.server.web.routers.common import BridgeDep, authorized, peer, schema_ref, token
from biolit_id.server.web.routers.identify import read_observation

router = APIRouter(prefix="/v1")

RESPONSE_DOC = {"200": {"description": "Darwin Core terms of the observation", "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "exportable": {"type": "boolean",
                       "description": "false for a rejection: no taxon, left out of archives"},
        "occurrence": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "Darwin Core term -> value ('' when unknown)"},
    }}}}}}


@router.post("/identify-observation/dwc", tags=["identify"],
             summary="An observation's answer as Darwin Core terms (IdentifyObservation)",
             dependencies=[authorized("IdentifyObservation")],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": schema_ref("IdentifyObservationRequest")}}}},
             responses=RESPONSE_DOC)
async def identify_observation_dwc(request: Request, bridge: BridgeDep):
    message = await read_observation(request)
    key, who = token(request), peer(request)
    answer = await run_in_threadpool(bridge.call, "IdentifyObservation", message, key, who)
    species = None
    if answer.decision.species:
        species = await run_in_threadpool(
            bridge.call, "GetSpecies",
            pb.GetSpeciesRequest(scientific_name=answer.decision.species), key, who)
    record = observation_occurrence(message, answer, species)
    return JSONResponse({"exportable": record.exportable, "occurrence": record.terms})
