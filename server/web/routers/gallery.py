"""The reference photos: nearest ones (SearchSimilar), list, add and remove (curation)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from biolit_id.index.core.errors import InvalidRequestError
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


async def read_exemplars(request: Request) -> list[pb.AddExemplarRequest]:
    """JSON ``{"exemplars": [AddExemplarRequest...]}``, or a form: one message per
    ``image`` part, the other fields (species, licence...) shared by all."""
    body = await json_body(request)
    if body is not None:
        if not isinstance(body, dict) or set(body) != {"exemplars"} or \
                not isinstance(body["exemplars"], list):
            raise InvalidRequestError('the JSON body must be {"exemplars": [AddExemplarRequest, '
                                      "...]}")
        return [from_json(item, pb.AddExemplarRequest) for item in body["exemplars"]]
    items = await fields(request)
    images = [value for name, value in items if name == "image"]
    shared = [(name, value) for name, value in items if name != "image"]
    base = from_fields(shared, pb.AddExemplarRequest)
    if not images:
        return [base]  # the servicer says what is missing
    out = []
    for image in images:
        item = pb.AddExemplarRequest()
        item.CopyFrom(base)
        item.image = image if isinstance(image, bytes) else image.encode()
        out.append(item)
    return out


@router.post("/similar", summary="Nearest reference photos (SearchSimilar)", tags=["gallery"],
             dependencies=[authorized("SearchSimilar")],
             **doc(pb.SearchSimilarRequest, pb.SearchSimilarResponse,
                   body="SearchSimilarRequest"))
async def similar(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "SearchSimilar",
                     await read_message(request, pb.SearchSimilarRequest))


@router.get("/exemplars", summary="Reference photos, paged (ListExemplars)", tags=["gallery"],
            **doc(pb.ListExemplarsRequest, pb.ListExemplarsResponse, query=True))
async def list_exemplars(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "ListExemplars",
                     await read_message(request, pb.ListExemplarsRequest))


@router.post("/exemplars", summary="Add reference photos (AddExemplars, role curate)",
             tags=["curation"], dependencies=[authorized("AddExemplars")],
             **doc(pb.AddExemplarRequest, pb.AddExemplarsResponse, body="AddExemplarsBody"))
async def add_exemplars(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "AddExemplars", await read_exemplars(request))


@router.post("/exemplars:remove", summary="Remove reference photos (RemoveExemplars)",
             tags=["curation"], dependencies=[authorized("RemoveExemplars")],
             **doc(pb.RemoveExemplarsRequest, pb.RemoveExemplarsResponse,
                   body="RemoveExemplarsRequest"))
async def remove_exemplars(request: Request, bridge: BridgeDep):
    return await run(request, bridge, "RemoveExemplars",
                     await read_message(request, pb.RemoveExemplarsRequest))


@router.delete("/exemplars/{exemplar_id}", summary="Remove one reference photo",
               tags=["curation"], **doc(None, pb.RemoveExemplarsResponse))
async def remove_exemplar(request: Request, bridge: BridgeDep, exemplar_id: int):
    return await run(request, bridge, "RemoveExemplars",
                     pb.RemoveExemplarsRequest(exemplar_ids=[exemplar_id]))
