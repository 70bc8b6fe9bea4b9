"""The /v1/ routes, one ``APIRouter`` per area; each route is one gRPC method.

* ``identify``: ``POST /v1/identify`` (Identify), ``POST /v1/identify-observation``
  (IdentifyObservation);
* ``darwin_core``: ``POST /v1/identify-observation/dwc`` (IdentifyObservation, as
  Darwin Core terms);
* ``gallery``: ``POST /v1/similar`` (SearchSimilar) and the reference photos,
  ``/v1/exemplars`` (ListExemplars, AddExemplars, RemoveExemplars);
* ``catalog``: ``GET /v1/info`` (GetServiceInfo) and the species,
  ``/v1/species`` (ListSpecies, GetSpecies, AddSpecies);
* ``common``: what they share: the bridge dependency, the key check that runs
  before a body is read (``authorized``), the readers of JSON and forms, and
  ``run``, which calls the servicer through the bridge.

``api.create_app`` includes ``ROUTERS`` and puts the bridge in ``app.state``.
"""

from __future__ import annotations

from fastapi import APIRouter

from biolit_id.server.web.routers import catalog, darwin_core, gallery, identify, models

ROUTERS: tuple[APIRouter, ...] = (identify.router, gallery.router, catalog.router, models.router,
                                  darwin_core.router)

__all__ = ["ROUTERS"]
