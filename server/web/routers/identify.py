"""Identification: one photo (Identify), or several photos of one find (IdentifyObservation)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.web.protojson import from_fields, from_json
from biolit_id.server.web.routers.common import (
    BridgeDep,
    authorized,
    doc,
    fields,
    json_body,
    read_message,
    run,
)

router = APIRouter(prefix="/v1")

PLACE = ("latitude", "longitude", "uncertainty_m", "uncertaintyM")


async def read_observation(request: Request) -> pb.IdentifyObservationRequest:
    """JSON (an IdentifyObservationRequest), or a form: one photo per ``image`` part,
    ``latitude``/``longitude``/``uncertainty_m`` for the place, the other fields as named."""
    body = await json_body(request)
    if body is not None:
        return from_json(body, pb.IdentifyObservationRequest)
    items = await fields(request)
    place = {name: value for name, value in items if name in PLACE}
    rest = [(n, v) for n, v in items if n != "image" and n not in PLACE]
    message = from_fields(rest, pb.IdentifyObservationRequest)
    for name, value in items:
        if name == "image":
            message.photos.add(image=value if isinstance(value, bytes) else value.encode())
    if place:
        message.location.CopyFrom(from_fields(list(place.items()), pb.Location))
    return message


@router.post("/identify", summary="Identify one photo (Identify)", tags=["identify"],
             dependencies=[authorized("Identify")],
             **doc(pb.IdentifyRequest, pb.IdentifyResponse, body="IdentifyRequest"))
async def identify(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "Identify", await read_message(request, pb.IdentifyRequest))


@router.post("/identify-observation", tags=["identify"],
             summary="Several photos of one find, with place and date (IdentifyObservation)",
             dependencies=[authorized("IdentifyObservation")],
             **doc(pb.IdentifyObservationRequest, pb.IdentifyObservationResponse,
                   body="IdentifyObservationRequest"))
async def identify_observation(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "IdentifyObservation", await read_observation(request))
