"""The service and its species: info (GetServiceInfo), list, get and add (curation)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.web.routers.common import BridgeDep, authorized, doc, read_message, run

router = APIRouter(prefix="/v1")


@router.get("/info", summary="Model, limits and versions (GetServiceInfo)", tags=["catalog"],
            **doc(None, pb.ServiceInfo))
async def info(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "GetServiceInfo", pb.GetServiceInfoRequest())


@router.get("/species", summary="Every species (ListSpecies)", tags=["catalog"],
            **doc(pb.ListSpeciesRequest, pb.ListSpeciesResponse, query=True))
async def list_species(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "ListSpecies",
                     await read_message(request, pb.ListSpeciesRequest))


@router.post("/species", summary="Add a species (AddSpecies, role curate)", tags=["curation"],
             dependencies=[authorized("AddSpecies")],
             **doc(pb.AddSpeciesRequest, pb.Species, body="AddSpeciesRequest"))
async def add_species(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "AddSpecies",
                     await read_message(request, pb.AddSpeciesRequest))


@router.get("/species/{scientific_name:path}", summary="One species (GetSpecies)",
            tags=["catalog"], **doc(None, pb.Species))
async def get_species(request: Request, bridge: BridgeDep, scientific_name: str):
    return await run(request, bridge, "GetSpecies",
                     pb.GetSpeciesRequest(scientific_name=scientific_name))
