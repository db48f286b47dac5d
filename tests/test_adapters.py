"""LoRA adapters beside a served model, from a path or from the storage URI a fine-tune wrote to
(``file://`` takes the same pyarrow path as ``s3://`` and ``gs://``, without credentials)."""

import json
from pathlib import Path

import pytest

from gpufleet.catalogue.errors import SpecError
from gpufleet.serve_apps.adapters import adapters_table, find_adapter, list_adapters, local_copy
from gpufleet.serve_apps.spec import ModelEntry


def adapter(d, rank=8):
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return d


def test_a_storage_folder_lists_and_finds_its_adapters(tmp_path):
    adapter(tmp_path / "bucket" / "greeter")
    adapter(tmp_path / "bucket" / "poet")
    (tmp_path / "bucket" / "notes").mkdir()  # no adapter_config.json: not an adapter
    table = adapters_table(ModelEntry(id="m", source="x", adapters_dir=f"file://{tmp_path}/bucket"), tmp_path)
    assert list_adapters(table) == ["greeter", "poet"]
    assert find_adapter(table, "greeter") == f"file://{tmp_path}/bucket/greeter"
    assert find_adapter(table, "notes") is None and find_adapter(table, "../bucket") is None


def test_an_adapter_a_finetune_uploaded_is_named_by_its_uri_and_copied_to_local_disk(tmp_path):
    adapter(tmp_path / "bucket" / "greet-job" / "final", rank=16)
    uri = f"file://{tmp_path}/bucket/greet-job/final"
    table = adapters_table(ModelEntry(id="m", source="x", adapters={"greeter": uri}), tmp_path)
    local = local_copy(find_adapter(table, "greeter"), cache=tmp_path / "cache")
    assert local.startswith(str(tmp_path / "cache"))
    assert json.loads((Path(local) / "adapter_config.json").read_text())["r"] == 16
    assert (Path(local) / "adapter_model.safetensors").stat().st_size == 64
    assert local_copy(str(tmp_path / "bucket" / "greet-job" / "final")) == str(tmp_path / "bucket" / "greet-job" / "final")


def test_a_uri_without_an_adapter_is_refused_with_the_fix(tmp_path):
    (tmp_path / "bucket" / "empty").mkdir(parents=True)
    with pytest.raises(SpecError, match=r"models\[m\].adapters.greeter: file://.*/empty has no adapter_config.json"):
        adapters_table(ModelEntry(id="m", source="x", adapters={"greeter": f"file://{tmp_path}/bucket/empty"}), tmp_path)


def test_publishing_swaps_the_store_entry_and_names_the_new_version(tmp_path):
    from gpufleet.cluster.adapter_store import adapter_version, publish_adapter

    v1, v2 = adapter(tmp_path / "v1"), adapter(tmp_path / "v2")
    (v2 / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    first = publish_adapter(str(v1), str(tmp_path / "store"), "greeter")
    assert adapter_version(str(tmp_path / "store" / "greeter")) == first["version"]
    second = publish_adapter(str(v2), str(tmp_path / "store"), "greeter")
    assert second["version"] != first["version"]
    assert adapter_version(str(tmp_path / "store" / "greeter")) == second["version"]
    assert (tmp_path / "store" / "greeter" / "adapter_model.safetensors").read_bytes() == b"\1" * 64
    table = adapters_table(ModelEntry(id="m", source="x", adapters_dir=str(tmp_path / "store")), tmp_path)
    assert list_adapters(table) == ["greeter"]  # the versions kept beside it are not adapters of the store


def test_publishing_to_a_bucket_writes_the_version_last_and_replicas_copy_each_version_apart(tmp_path):
    from gpufleet.cluster.adapter_store import adapter_version, publish_adapter

    store = f"file://{tmp_path}/bucket/adapters"
    v1 = adapter(tmp_path / "v1")
    record = publish_adapter(str(v1), store, "greeter")
    assert adapter_version(f"{store}/greeter") == record["version"]
    copy = local_copy(f"{store}/greeter", cache=tmp_path / "cache", version=record["version"])
    assert copy.endswith(f"@{record['version']}") and (Path(copy) / "adapter_model.safetensors").exists()


def test_an_adapter_copied_in_by_hand_is_versioned_by_its_weights_file(tmp_path):
    from gpufleet.cluster.adapter_store import adapter_version

    d = adapter(tmp_path / "a")
    before = adapter_version(str(d))
    (d / "adapter_model.safetensors").write_bytes(b"\2" * 65)
    assert before and adapter_version(str(d)) != before
    assert adapter_version(str(tmp_path / "missing")) is None
