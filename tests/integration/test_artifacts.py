"""The content-addressed artifact store on a real directory and through fsspec: digests, manifests, refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.runtime.artifacts import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactRejected,
    ArtifactStore,
)

pytestmark = pytest.mark.integration


def adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({"lora_A": torch.ones(2, 4), "lora_B": torch.zeros(4, 2)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    (path / "sub").mkdir()
    (path / "sub" / "README.md").write_text("trained on support-v1")
    return path


def test_bytes_are_stored_under_their_digest_once(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    first = store.put_bytes(b'{"a": 1}', kind="json")
    again = store.put_bytes(b'{"a": 1}', kind="json")
    assert first == again
    assert first.uri.endswith(f"/sha256/{first.sha256[:2]}/{first.sha256}")
    assert first.uri.startswith("file://") and first.size == 8
    assert store.get_bytes(first.uri, first.sha256) == b'{"a": 1}'
    assert len(list((tmp_path / "artifacts").rglob("*"))) == 3  # sha256/, sha256/xx/, the blob: no temp files left


def test_directory_round_trips_with_a_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    ref = store.put_directory(adapter_dir(tmp_path / "adapter"))
    assert set(store.manifest(ref)) == {"adapter_model.safetensors", "adapter_config.json", "sub/README.md"}
    out = store.materialize(ref, into_dir=tmp_path / "out")
    assert out == tmp_path / "out"
    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))["lora_A"], torch.ones(2, 4))
    assert (out / "sub" / "README.md").read_text() == "trained on support-v1"
    # The same directory stored again is the same artifact.
    assert store.put_directory(tmp_path / "adapter") == ref


def test_fsspec_url_root_works_unchanged(tmp_path: Path) -> None:
    store = ArtifactStore("memory://flywheel-test/artifacts")
    ref = store.put_directory(adapter_dir(tmp_path / "adapter"))
    assert ref.uri.startswith("memory://")
    out = store.materialize(ref.uri, ref.sha256, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_tampered_blob_is_refused_on_load_and_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    ref = store.put_directory(adapter_dir(tmp_path / "adapter"))
    weights = store.manifest(ref)["adapter_model.safetensors"]["sha256"]
    blob = tmp_path / "artifacts" / "sha256" / weights[:2] / weights
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ArtifactIntegrityError, match="tampered or corrupt"):
        store.materialize(ref, into_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_a_digest_other_than_the_name_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    ref = store.put_bytes(b"hello", kind="text")
    with pytest.raises(ArtifactIntegrityError, match="expected"):
        store.get_bytes(ref.uri, "0" * 64)
    with pytest.raises(ArtifactNotFound):
        store.get_bytes(store.uri_for("1" * 64))
    assert store.get_bytes(ArtifactRef(ref.uri, ref.sha256, ref.size)) == b"hello"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pkl", "model.ckpt"])
def test_pickle_based_weight_files_are_refused(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(ArtifactRejected, match="safetensors"):
        store.put_file(path)


def test_pickles_are_refused_whatever_they_are_called(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ArtifactRejected, match="pickle"):
        store.put_bytes(pickle.dumps([1, 2, 3]), kind="safetensors")
    disguised = tmp_path / "adapter_model.safetensors"
    torch.save({"w": torch.ones(1)}, disguised)  # a zip archive with a pickle inside
    with pytest.raises(ArtifactRejected, match="zip"):
        store.put_file(disguised)
    disguised.write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactRejected, match="not a safetensors file"):
        store.put_file(disguised)


def test_a_directory_with_a_bin_file_stores_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    directory = adapter_dir(tmp_path / "adapter")
    (directory / "training_args.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(ArtifactRejected, match="training_args.bin"):
        store.put_directory(directory)
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").rglob("*"))
