"""``gallery export`` a FAISS gallery, ``gallery import`` it into Milvus: same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from biolit_id.cli.main import main
from biolit_id.proto import identification_pb2 as pb
from conftest import photo_bytes, stub_for

NEW = "Migratus novus"


def all_exemplars(stub) -> list[pb.Exemplar]:
    out, token = [], ""
    while True:
        page = stub.ListExemplars(pb.ListExemplarsRequest(page_size=3, page_token=token,
                                                          include_thumbnails=True))
        out += list(page.exemplars)
        token = page.next_page_token
        if not token:
            return out


def key(e: pb.Exemplar) -> tuple:
    return (e.exemplar_id, e.species, e.content_sha256, e.source_uri, e.license,
            e.contributor, e.observation_id, e.thumbnail)


def test_faiss_gallery_moves_into_milvus_with_ids_metadata_and_answers(
        make_server, milvus_uri, demo_model_spec, tmp_path: Path, capsys):
    src = make_server(data_dir=tmp_path / "faiss")
    stub = stub_for(src)
    stub.AddSpecies(pb.AddSpeciesRequest(
        scientific_name=NEW,
        taxonomy=pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_GENUS, name="Migratus")])))
    names = src.state.gallery.prototypes().names
    rng = np.random.default_rng(4)
    embeddings = rng.normal(size=(4, 512)).astype(np.float32)
    requests = (
        [pb.AddExemplarRequest(species=names[2], image=photo_bytes(s), license="CC-BY",
                               contributor="Ana", source_uri=f"https://x/{s}.jpg")
         for s in range(3)]
        + [pb.AddExemplarRequest(species=NEW, image=photo_bytes(10 + s), observation_id=f"o{s}")
           for s in range(2)]
        + [pb.AddExemplarRequest(species=names[7], embedding=v.tolist()) for v in embeddings]
    )
    added = stub.AddExemplars(iter(requests))
    stub.RemoveExemplars(pb.RemoveExemplarsRequest(exemplar_ids=[added.exemplar_ids[0]]))
    before = all_exemplars(stub)
    assert len(before) == 8 and any(e.thumbnail for e in before)
    queries = rng.normal(size=(3, 512)).astype(np.float32)
    src_answers = [stub.SearchSimilar(pb.SearchSimilarRequest(embedding=q.tolist(), k=5))
                   for q in queries]

    # Export while the FAISS server runs (WAL readers do not block it), then import.
    out = tmp_path / "gallery.parquet"
    assert main(["gallery", "export", str(out), "--data-dir", str(tmp_path / "faiss"),
                 "--no-progress"]) == 0
    assert pq.ParquetFile(out).metadata.num_rows == 8
    lite = milvus_uri()  # milvus-lite, then a real Milvus server
    imported = ["gallery", "import", str(out), "--gallery", lite, "--model", demo_model_spec,
                "--data-dir", str(tmp_path / "import"), "--no-progress"]
    assert main(imported) == 0
    assert "imported 8 exemplars (0 already there)" in capsys.readouterr().out
    assert main(imported) == 0  # resumable: a re-run finds everything there
    assert "imported 0 exemplars (8 already there)" in capsys.readouterr().out

    dst = make_server(data_dir=tmp_path / "dst", gallery=milvus_uri("poll=0"))
    dst_stub = stub_for(dst)
    after = all_exemplars(dst_stub)
    assert sorted(map(key, after)) == sorted(map(key, before))  # ids kept, thumbnails too
    for q, want in zip(queries, src_answers, strict=True):
        got = dst_stub.SearchSimilar(pb.SearchSimilarRequest(embedding=q.tolist(), k=5))
        assert [h.exemplar_id for h in got.results] == [h.exemplar_id for h in want.results]
        np.testing.assert_allclose([h.score for h in got.results],
                                   [h.score for h in want.results], atol=1e-5)
    assert dst.state.gallery.knows(NEW)
    src_protos, dst_protos = src.state.gallery.prototypes(), dst.state.gallery.prototypes()
    for name in (names[2], names[7], NEW):
        np.testing.assert_allclose(dst_protos.vectors[dst_protos.index()[name]],
                                   src_protos.vectors[src_protos.index()[name]], atol=1e-5)
    assert dst.state.gallery.exemplar_counts() == src.state.gallery.exemplar_counts()
    # Re-sending migrated photos (bytes, an embedding) finds them under their FAISS ids.
    again = dst_stub.AddExemplars(iter([requests[1], requests[5]]))
    assert list(again.exemplar_ids) == [added.exemplar_ids[1], added.exemplar_ids[5]]
    assert list(again.species_updated) == []
    assert sorted(map(key, all_exemplars(dst_stub))) == sorted(map(key, before))

    # And back out of Milvus: the same rows, embeddings bit-exact.
    back = tmp_path / "back.parquet"
    assert main(["gallery", "export", str(back), "--gallery", lite, "--no-progress"]) == 0
    first = pq.read_table(out).sort_by("id").to_pydict()
    second = pq.read_table(back).sort_by("id").to_pydict()
    assert first == second
