"""The real open_clip loading path, on a demo model in BioCLIP's on-disk format."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from biolit_id.server.inference.model_loader import (
    ModelUnavailableError,
    load_model,
    resolve_model_dir,
)
from biolit_id.server.inference.text_prototypes import TextPrototypeCache


def test_demo_model_has_bioclip_layout(demo_model_dir: Path) -> None:
    config = json.loads((demo_model_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 512
    assert (demo_model_dir / "open_clip_pytorch_model.bin").is_file()


def test_local_dir_loads_512d_unit_text_embeddings(loaded_demo_model) -> None:
    assert loaded_demo_model.embedding_dim == 512
    assert loaded_demo_model.image_size == 224
    emb = loaded_demo_model.encode_text(["a photo of Carcinus maenas.", "a photo of Fucus."])
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_fingerprint_is_stable_and_content_based(demo_model_spec: str, tmp_path: Path) -> None:
    from biolit_id.cli.demo_model import write_demo_model

    other = write_demo_model(tmp_path / "other", seed=1)
    a = load_model(demo_model_spec).fingerprint
    assert a == load_model(demo_model_spec).fingerprint
    assert a != load_model(f"local-dir:{other}").fingerprint


def test_missing_local_dir_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="demo-model"):
        resolve_model_dir(f"local-dir:{tmp_path / 'nothing'}")


@pytest.mark.parametrize("repo", ["imageomics/bioclip", "imageomics/bioclip-2"])
def test_unreachable_hub_fails_fast_with_instructions(repo: str, tmp_path: Path,
                                                      monkeypatch) -> None:
    # A closed loopback port stands in for a hub that cannot be reached.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        load_model(f"hf-hub:{repo}")
    assert time.monotonic() - started < 30, "must fail within seconds, not hang"
    message = str(err.value)
    assert f"huggingface-cli download {repo} --local-dir ./models/{repo.split('/')[1]}" in message
    assert f"local-dir:./models/{repo.split('/')[1]}" in message


def test_vit_l14_demo_model_is_bioclip2_shaped(vit_l14_model_dir: Path) -> None:
    import torch

    config = json.loads((vit_l14_model_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 768
    assert config["model_cfg"]["vision_cfg"] == {"image_size": 224, "layers": 24,
                                                 "width": 1024, "patch_size": 14}
    state = torch.load(vit_l14_model_dir / "open_clip_pytorch_model.bin", weights_only=True)
    assert state["visual.proj"].dtype == torch.float16  # half the disk; loaded as fp32
    loaded = load_model(f"local-dir:{vit_l14_model_dir}")
    assert (loaded.embedding_dim, loaded.image_size) == (768, 224)
    assert next(loaded.model.parameters()).dtype == torch.float32
    np.testing.assert_array_equal(loaded.model.visual.proj.detach().numpy(),
                                  state["visual.proj"].float().numpy())
    emb = loaded.encode_text(["a photo of Animalia Mollusca Gastropoda Patella vulgata."])
    assert emb.shape == (1, 768)


def test_tiny_model_of_another_width(tmp_path: Path) -> None:
    from biolit_id.cli.demo_model import write_demo_model

    loaded = load_model(f"local-dir:{write_demo_model(tmp_path / 'm', embed_dim=768)}")
    assert loaded.embedding_dim == 768
    assert loaded.encode_text(["x"]).shape == (1, 768)


def test_loading_skips_the_random_draw_and_nothing_else(demo_model_dir: Path) -> None:
    import open_clip
    import torch

    from biolit_id.server.inference.model_loader import skipping_random_init

    before = torch.nn.init.kaiming_uniform_
    plain = open_clip.create_model(f"local-dir:{demo_model_dir}")  # with the random draw
    loaded = load_model(f"local-dir:{demo_model_dir}")
    assert torch.nn.init.kaiming_uniform_ is before  # restored
    a, b = plain.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with skipping_random_init():
        weight = torch.full((3, 3), 7.0)
        torch.nn.init.normal_(weight)
        assert torch.equal(weight, torch.full((3, 3), 7.0))
    torch.nn.init.normal_(weight)
    assert not torch.equal(weight, torch.full((3, 3), 7.0))


def test_a_folder_without_weights_is_refused(demo_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "open_clip_config.json").write_bytes(
        (demo_model_dir / "open_clip_config.json").read_bytes())
    with pytest.raises(ModelUnavailableError, match="no weights"):
        load_model(f"local-dir:{tmp_path}")


def test_text_prototypes_are_cached_per_model(loaded_demo_model, tmp_path: Path) -> None:
    prompts = ["a photo of Animalia Mollusca Gastropoda Patella vulgata.", "a photo of x."]
    first = TextPrototypeCache(loaded_demo_model, tmp_path)
    vectors = first.embed(prompts)
    assert first.computed == 2
    second = TextPrototypeCache(loaded_demo_model, tmp_path)
    np.testing.assert_array_equal(second.embed(prompts), vectors)
    assert second.computed == 0, "a restart must not recompute cached prompts"
