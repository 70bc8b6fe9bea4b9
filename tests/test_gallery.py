"""The gallery over real gRPC: runtime species, adds, removes, search, restart, bad input.

The demo model has random weights, so "species" here are synthetic photo
families: one base colour field and gradient per species, different noise
per photo. Its embeddings put photos of one family at cosine ~1.0 and other
families at 0.7-0.99, while its random text prototypes sit near cosine 0 to
every photo. That is enough to check the mechanics (the answer follows the
gallery), not accuracy.
"""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.grpc.curation import content_hash_of_embedding
from conftest import stub_for

NEW_SPECIES = "Nudibranchus imaginarius"


def species_photo(family: int, index: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """Photo ``index`` of synthetic species ``family``: shared colour field, own noise."""
    look = np.random.default_rng(family)
    base = look.uniform(0, 255, size=3)
    grad = look.uniform(-120, 120, size=(2, 3))
    noise = np.random.default_rng(10_000 * family + index)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    arr += noise.normal(0, 12, size=arr.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(out, format="JPEG")
    return out.getvalue()


def add(stub, species: str, photos: list[bytes], **meta) -> pb.AddExemplarsResponse:
    return stub.AddExemplars(iter(
        [pb.AddExemplarRequest(species=species, image=p, **meta) for p in photos]
    ))


def listed_ids(stub, species: str = "") -> list[int]:
    resp = stub.ListExemplars(pb.ListExemplarsRequest(species=species, page_size=1000))
    return [e.exemplar_id for e in resp.exemplars]


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def test_new_species_from_five_photos(make_server) -> None:
    running = make_server()
    stub = stub_for(running)
    created = stub.AddSpecies(pb.AddSpeciesRequest(
        scientific_name=NEW_SPECIES,
        vernacular_names=[pb.VernacularName(name="Limace imaginaire", language="fr")],
        taxonomy=pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_GENUS, name="Nudibranchus")]),
    ))
    assert created.added_at_runtime and created.has_prototype and created.exemplar_count == 0
    assert not created.has_visual_prototype  # text only until it has photos
    # Identifiable at once from its text prompt: it is scored among all species.
    query = species_photo(1, 99)
    before = stub.Identify(pb.IdentifyRequest(image=query, top_k=1000))
    assert NEW_SPECIES in [c.species for c in before.prototype_candidates]
    assert before.decision.species != NEW_SPECIES

    distractors = add(stub, "Carcinus maenas", [species_photo(2, i) for i in range(3)])
    five = add(stub, NEW_SPECIES, [species_photo(1, i) for i in range(5)],
               license="CC-BY-4.0", contributor="tester")
    assert len(five.exemplar_ids) == 5 and five.species_updated == [NEW_SPECIES]
    assert five.gallery_version > distractors.gallery_version

    resp = stub.Identify(pb.IdentifyRequest(image=query, num_similar=3))
    assert resp.decision.species == NEW_SPECIES
    assert resp.decision.method == pb.METHOD_ZERO_SHOT
    assert resp.prototype_candidates[0].species == NEW_SPECIES
    assert resp.similar[0].exemplar_id in five.exemplar_ids
    assert resp.similar[0].species == NEW_SPECIES
    assert resp.similar[0].license == "CC-BY-4.0" and resp.similar[0].contributor == "tester"
    assert not resp.similar[0].thumbnail  # only when asked for
    assert resp.versions.gallery_version == five.gallery_version
    assert [s.score for s in resp.similar] == sorted((s.score for s in resp.similar),
                                                     reverse=True)
    # The genus given at AddSpecies makes it reachable through restrict_to.
    restricted = stub.Identify(pb.IdentifyRequest(image=query, restrict_to=["Nudibranchus"]))
    assert restricted.decision.species == NEW_SPECIES
    info = stub.GetSpecies(pb.GetSpeciesRequest(scientific_name=NEW_SPECIES))
    assert info.exemplar_count == 5 and info.has_visual_prototype
    assert stub.GetServiceInfo(pb.GetServiceInfoRequest()).gallery_size == 8


def test_adding_photos_changes_prototype_and_answer(make_server) -> None:
    running = make_server()
    stub = stub_for(running)
    query = species_photo(3, 50)
    before = stub.Identify(pb.IdentifyRequest(image=query, top_k=3))
    target = next(n for n in ("Carcinus maenas", "Patella vulgata")
                  if n != before.prototype_candidates[0].species)
    gallery = running.state.gallery
    row = gallery.prototypes().index()[target]
    old_vector = gallery.prototypes().vectors[row].copy()

    resp = add(stub, target, [species_photo(3, i) for i in range(5)])
    assert resp.species_updated == [target]
    new_vector = gallery.prototypes().vectors[row]
    assert float(old_vector @ new_vector) < 0.99  # the prototype moved towards the photos
    after = stub.Identify(pb.IdentifyRequest(image=query, num_similar=5))
    assert after.decision.species == target
    assert {s.exemplar_id for s in after.similar} == set(resp.exemplar_ids)


def test_remove_updates_search_and_prototype(make_server) -> None:
    running = make_server()
    stub = stub_for(running)
    species = "Mytilus edulis"
    gallery = running.state.gallery
    row = gallery.prototypes().index()[species]
    text_only = gallery.prototypes().vectors[row].copy()
    ids = list(add(stub, species, [species_photo(4, i) for i in range(3)]).exemplar_ids)
    with_three = gallery.prototypes().vectors[row].copy()

    missing = rpc_error(stub.RemoveExemplars,
                        pb.RemoveExemplarsRequest(exemplar_ids=[ids[0], 987654]))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "987654" in missing.details()
    assert listed_ids(stub) == ids  # all or nothing: the known id is still there

    resp = stub.RemoveExemplars(pb.RemoveExemplarsRequest(exemplar_ids=[ids[0]]))
    assert resp.removed_count == 1 and resp.species_updated == [species]
    assert listed_ids(stub) == ids[1:]
    found = stub.SearchSimilar(pb.SearchSimilarRequest(image=species_photo(4, 0), k=10))
    assert [r.exemplar_id for r in found.results] == sorted(
        ids[1:], key=lambda i: -next(r.score for r in found.results if r.exemplar_id == i))
    assert ids[0] not in [r.exemplar_id for r in found.results]
    assert not np.array_equal(gallery.prototypes().vectors[row], with_three)
    # Removing them all puts the text prototype back, exactly.
    stub.RemoveExemplars(pb.RemoveExemplarsRequest(exemplar_ids=ids[1:]))
    assert np.array_equal(gallery.prototypes().vectors[row], text_only)
    assert stub.GetSpecies(pb.GetSpeciesRequest(scientific_name=species)).exemplar_count == 0
    again = rpc_error(stub.RemoveExemplars, pb.RemoveExemplarsRequest(exemplar_ids=ids[:1]))
    assert again.code() == grpc.StatusCode.NOT_FOUND


def test_restart_gives_identical_state(make_server) -> None:
    first = make_server()
    stub = stub_for(first)
    stub.AddSpecies(pb.AddSpeciesRequest(scientific_name=NEW_SPECIES))
    add(stub, NEW_SPECIES, [species_photo(5, i) for i in range(3)])
    add(stub, "Carcinus maenas", [species_photo(6, i) for i in range(2)])
    rng = np.random.default_rng(0)
    stub.AddExemplars(iter([pb.AddExemplarRequest(species="Patella vulgata",
                                                  embedding=rng.normal(size=512).tolist())]))
    stub.RemoveExemplars(pb.RemoveExemplarsRequest(exemplar_ids=[2]))
    before = first.state.gallery.prototypes()
    ids = listed_ids(stub)
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    query = pb.IdentifyRequest(image=species_photo(5, 9), num_similar=4, top_k=5)
    answer = stub.Identify(query)
    first.stop(0.5)

    second = make_server()
    stub = stub_for(second)
    gallery = second.state.gallery
    assert gallery.recovery == "snapshot"
    after = gallery.prototypes()
    assert after.names == before.names and np.array_equal(after.vectors, before.vectors)
    assert listed_ids(stub) == ids
    again = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert again.gallery_size == info.gallery_size == 5
    assert again.versions.gallery_version == info.versions.gallery_version
    assert again.catalog_size == info.catalog_size
    species = stub.GetSpecies(pb.GetSpeciesRequest(scientific_name=NEW_SPECIES))
    assert species.added_at_runtime and species.exemplar_count == 2
    replay = stub.Identify(query)
    assert replay.decision == answer.decision
    assert [(s.exemplar_id, s.score) for s in replay.similar] == [
        (s.exemplar_id, s.score) for s in answer.similar
    ]
    assert gallery.index.exemplar_count == gallery.store.count() == 5


def test_bad_input_and_stream_failing_midway(make_server) -> None:
    stub = stub_for(make_server())
    unknown = rpc_error(add, stub, "Nonexistus fictus", [species_photo(7, 0)])
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "AddSpecies" in unknown.details()

    species = "Carcinus maenas"
    good = [species_photo(7, i) for i in range(3)]
    stream = [
        pb.AddExemplarRequest(species=species, image=good[0]),
        pb.AddExemplarRequest(species=species, image=good[1]),
        pb.AddExemplarRequest(species=species, image=b"this is not a photo at all"),
        pb.AddExemplarRequest(species=species, image=good[2]),
    ]
    failed = rpc_error(stub.AddExemplars, iter(stream))
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2" in failed.details()
    stored = stub.ListExemplars(pb.ListExemplarsRequest())
    assert stored.total_count == 2  # the two before the failure, nothing after
    # The prototype reflects what was stored even though the call failed.
    assert stub.GetSpecies(pb.GetSpeciesRequest(scientific_name=species)).exemplar_count == 2

    # Duplicate photo, same species: idempotent, same id, nothing stored, version unchanged.
    again = add(stub, species, good[:3])
    first_ids = [e.exemplar_id for e in stored.exemplars]
    assert list(again.exemplar_ids[:2]) == first_ids
    assert again.exemplar_ids[2] not in first_ids
    version = again.gallery_version
    dup = add(stub, species, good[:1])
    assert list(dup.exemplar_ids) == first_ids[:1] and dup.gallery_version == version
    assert not dup.species_updated
    # The same photo for another species is another exemplar.
    other = add(stub, "Patella vulgata", good[:1])
    assert other.exemplar_ids[0] not in again.exemplar_ids

    bad_requests = [
        pb.AddExemplarRequest(species=species),
        pb.AddExemplarRequest(species=species, image=good[0], embedding=[0.1] * 512),
        pb.AddExemplarRequest(species=species, embedding=[0.1] * 7),
        pb.AddExemplarRequest(species=species, embedding=[0.0] * 512),
        pb.AddExemplarRequest(image=good[0]),
    ]
    for request in bad_requests:
        err = rpc_error(stub.AddExemplars, iter([request]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    assert stub.ListExemplars(pb.ListExemplarsRequest()).total_count == 4

    exists = rpc_error(stub.AddSpecies, pb.AddSpeciesRequest(scientific_name=species))
    assert exists.code() == grpc.StatusCode.ALREADY_EXISTS
    stub.AddSpecies(pb.AddSpeciesRequest(scientific_name=NEW_SPECIES))
    twice = rpc_error(stub.AddSpecies, pb.AddSpeciesRequest(scientific_name=NEW_SPECIES))
    assert twice.code() == grpc.StatusCode.ALREADY_EXISTS
    empty = rpc_error(stub.AddSpecies, pb.AddSpeciesRequest(scientific_name="  "))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    none = rpc_error(stub.RemoveExemplars, pb.RemoveExemplarsRequest())
    assert none.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_exemplars_pages(make_server) -> None:
    stub = stub_for(make_server())
    a = add(stub, "Carcinus maenas", [species_photo(8, i) for i in range(4)]).exemplar_ids
    b = add(stub, "Patella vulgata", [species_photo(9, i) for i in range(3)]).exemplar_ids
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListExemplars(pb.ListExemplarsRequest(page_size=3, page_token=token))
        assert page.total_count == 7 and len(page.exemplars) <= 3
        seen += [e.exemplar_id for e in page.exemplars]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and seen == list(a) + list(b)
    only_b = stub.ListExemplars(pb.ListExemplarsRequest(species="Patella vulgata",
                                                        include_thumbnails=True))
    assert [e.exemplar_id for e in only_b.exemplars] == list(b) and only_b.total_count == 3
    thumb = Image.open(io.BytesIO(only_b.exemplars[0].thumbnail))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert len(only_b.exemplars[0].content_sha256) == 64
    assert only_b.exemplars[0].added_at.seconds > 0
    for request, code in (
        (pb.ListExemplarsRequest(page_token="garbage"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListExemplarsRequest(page_size=1001), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListExemplarsRequest(species="Nonexistus fictus"), grpc.StatusCode.NOT_FOUND),
    ):
        assert rpc_error(stub.ListExemplars, request).code() == code


def test_search_similar(make_server) -> None:
    stub = stub_for(make_server())
    crabs = add(stub, "Carcinus maenas", [species_photo(10, i) for i in range(3)]).exemplar_ids
    limpets = add(stub, "Patella vulgata", [species_photo(11, i) for i in range(3)]).exemplar_ids
    rng = np.random.default_rng(1)
    vector = rng.normal(size=512)
    as_embedding = stub.AddExemplars(iter([pb.AddExemplarRequest(
        species="Patella vulgata", embedding=vector.tolist())]))
    by_image = stub.SearchSimilar(pb.SearchSimilarRequest(image=species_photo(10, 7), k=3))
    assert {r.exemplar_id for r in by_image.results} == set(crabs)
    by_id = stub.SearchSimilar(pb.SearchSimilarRequest(exemplar_id=crabs[0], k=2))
    assert crabs[0] not in [r.exemplar_id for r in by_id.results]  # not itself
    assert {r.exemplar_id for r in by_id.results} == set(crabs[1:])
    by_vec = stub.SearchSimilar(pb.SearchSimilarRequest(embedding=vector.tolist(), k=1))
    assert by_vec.results[0].exemplar_id == as_embedding.exemplar_ids[0]
    assert by_vec.results[0].score == pytest.approx(1.0, abs=1e-5)
    # Filters: by species, and by taxon (Patella is a genus in the catalog).
    filtered = stub.SearchSimilar(pb.SearchSimilarRequest(
        image=species_photo(10, 7), k=10, species="Patella vulgata"))
    assert {r.species for r in filtered.results} == {"Patella vulgata"}
    by_taxon = stub.SearchSimilar(pb.SearchSimilarRequest(
        image=species_photo(10, 7), k=10, taxon="Patella", include_thumbnails=True))
    assert {r.exemplar_id for r in by_taxon.results} == set(limpets) | set(
        as_embedding.exemplar_ids)
    assert all(r.thumbnail for r in by_taxon.results if r.exemplar_id in limpets)
    for request, code in (
        (pb.SearchSimilarRequest(k=3), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchSimilarRequest(exemplar_id=424242), grpc.StatusCode.NOT_FOUND),
        (pb.SearchSimilarRequest(exemplar_id=crabs[0], k=101), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchSimilarRequest(image=b"nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchSimilarRequest(exemplar_id=crabs[0], taxon="Nowhereia"),
         grpc.StatusCode.NOT_FOUND),
    ):
        assert rpc_error(stub.SearchSimilar, request).code() == code
    same = content_hash_of_embedding(vector.tolist())
    listed = stub.ListExemplars(pb.ListExemplarsRequest(species="Patella vulgata"))
    assert same in [e.content_sha256 for e in listed.exemplars]


def test_identify_keeps_serving_during_adds(make_server) -> None:
    running = make_server(max_workers=6)
    stub = stub_for(running)
    species = "Carcinus maenas"
    add(stub, species, [species_photo(12, 0)])
    errors: list[BaseException] = []
    answers: dict[int, list[pb.IdentifyResponse]] = {i: [] for i in range(3)}
    stop = threading.Event()

    def identify(reader: int) -> None:
        rng = np.random.default_rng(reader)
        while not stop.is_set():
            try:
                answers[reader].append(stub.Identify(pb.IdentifyRequest(
                    embedding=rng.normal(size=512).tolist(), num_similar=5)))
            except BaseException as exc:  # any failure fails the test
                errors.append(exc)
                return

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition() and not errors and time.monotonic() < deadline:
            time.sleep(0.01)

    readers = [threading.Thread(target=identify, args=(i,)) for i in answers]
    for t in readers:
        t.start()
    wait_until(lambda: all(answers.values()))  # every reader is running before the adds
    rng = np.random.default_rng(2)
    final = 0
    for _ in range(6):
        batch = [pb.AddExemplarRequest(species=species, embedding=rng.normal(size=512).tolist())
                 for _ in range(5)]
        final = stub.AddExemplars(iter(batch)).gallery_version
    wait_until(lambda: all(a[-1].versions.gallery_version == final for a in answers.values()))
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    for seen in answers.values():  # each reader saw the gallery move forward, never back
        versions = [a.versions.gallery_version for a in seen]
        assert versions == sorted(versions) and versions[0] < versions[-1] == final
    valid = set(listed_ids(stub))
    assert all(s.exemplar_id in valid for seen in answers.values() for a in seen
               for s in a.similar)
    assert len(valid) == 31
