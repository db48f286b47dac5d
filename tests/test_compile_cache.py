"""vLLM's compile cache carried through a serve spec's storage: saved once from a node that compiled, restored
into a fresh node's folder before its engine starts, keyed by what a compiled graph depends on."""

import sys
from pathlib import Path

import pytest
import yaml

from gpufleet.serve_apps import compile_cache
from gpufleet.serve_apps.compile_cache import RESTORED, cache_key, restore, save

KEY = cache_key("meta-llama/Llama-3.2-1B", {"max_model_len": 2048}, "H100", {"vllm": "0.26.0", "torch": "2.11.0"})


def compiled(folder: Path) -> dict[str, bytes]:
    """A node's cache folder as vLLM leaves it after compiling (its layout, small files)."""
    files = {"torch_compile_cache/49488b5a6d/rank_0_0/backbone/artifact": b"graph",
             "torch_compile_cache/49488b5a6d/rank_0_0/backbone/cache_key_factors.json": b"{}"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != RESTORED}


def test_a_cache_saved_to_storage_is_restored_into_a_fresh_nodes_folder(tmp_path):
    store = (tmp_path / "bucket").as_uri()
    files = compiled(tmp_path / "node-a" / KEY)
    assert save(store, KEY, tmp_path / "node-a" / KEY)
    assert (tmp_path / "bucket" / "compile-cache" / f"{KEY}.tar.gz").is_file()
    assert restore(store, KEY, tmp_path / "node-b" / KEY)
    assert contents(tmp_path / "node-b" / KEY) == files


def test_a_store_on_a_mounted_filesystem_needs_no_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # a node image without it: importing it raises
    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)
    files = compiled(tmp_path / "node-a" / KEY)
    for store in (str(tmp_path / "nfs"), (tmp_path / "nfs 2").as_uri()):
        assert save(store, KEY, tmp_path / "node-a" / KEY)
        assert restore(store, KEY, tmp_path / "node-b" / store[-5:] / KEY)
        assert contents(tmp_path / "node-b" / store[-5:] / KEY) == files
    assert (tmp_path / "nfs 2" / "compile-cache" / f"{KEY}.tar.gz").is_file()


def test_a_bucket_store_goes_through_pyarrows_filesystem(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # what s3:// would give, on local disk
    monkeypatch.setattr(compile_cache, "storage", lambda uri: (bucket, uri.removeprefix("s3://")))
    files = compiled(tmp_path / "node-a" / KEY)
    assert save("s3://bucket", KEY, tmp_path / "node-a" / KEY)
    assert (tmp_path / "bucket" / "compile-cache" / f"{KEY}.tar.gz").is_file()
    assert not [p for p in (tmp_path / "bucket" / "compile-cache").iterdir() if p.name.endswith(".part")]
    assert restore("s3://bucket", KEY, tmp_path / "node-b" / KEY)
    assert contents(tmp_path / "node-b" / KEY) == files


def test_the_key_changes_with_the_model_the_engine_arguments_the_gpu_and_the_versions():
    base = ("meta-llama/Llama-3.2-1B", {"max_model_len": 2048}, "H100", {"vllm": "0.26.0", "torch": "2.11.0"})
    changed = [("Qwen/Qwen3-8B", *base[1:]), (base[0], {"max_model_len": 4096}, *base[2:]),
               (*base[:2], "A100-80G", base[3]), (*base[:3], {"vllm": "0.27.0", "torch": "2.11.0"})]
    assert cache_key(*base) == KEY
    assert len({cache_key(*c) for c in changed} | {KEY}) == 5


def test_nothing_compiled_is_not_saved_and_a_stored_archive_is_not_replaced(tmp_path):
    store = (tmp_path / "bucket").as_uri()
    (tmp_path / "empty" / KEY).mkdir(parents=True)
    assert not save(store, KEY, tmp_path / "empty" / KEY)
    compiled(tmp_path / "a" / KEY)
    assert save(store, KEY, tmp_path / "a" / KEY)
    (tmp_path / "b" / KEY / "other").mkdir(parents=True)
    (tmp_path / "b" / KEY / "other" / "graph").write_bytes(b"later")
    assert not save(store, KEY, tmp_path / "b" / KEY)  # the first archive stays
    assert restore(store, KEY, tmp_path / "c" / KEY)
    assert "other/graph" not in contents(tmp_path / "c" / KEY)


def test_a_node_restores_once_and_keeps_what_it_compiled_since(tmp_path):
    store = (tmp_path / "bucket").as_uri()
    compiled(tmp_path / "a" / KEY)
    save(store, KEY, tmp_path / "a" / KEY)
    folder = tmp_path / "b" / KEY
    assert restore(store, KEY, folder)
    (folder / "torch_compile_cache" / "49488b5a6d" / "rank_0_0" / "backbone" / "artifact").write_bytes(b"newer")
    assert not restore(store, KEY, folder)  # a restarted replica on the same node
    assert contents(folder)["torch_compile_cache/49488b5a6d/rank_0_0/backbone/artifact"] == b"newer"


def test_a_fresh_node_with_no_archive_in_storage_starts_empty_and_says_so(tmp_path):
    folder = tmp_path / "node" / KEY
    assert not restore((tmp_path / "bucket").as_uri(), KEY, folder)
    assert contents(folder) == {} and (folder / RESTORED).exists()


def test_a_spec_with_storage_gives_every_replica_the_store_as_a_uri(tmp_path, tiny_model):
    from gpufleet.serve_apps.app import llm_configs
    from gpufleet.serve_apps.spec import load_serve_spec

    spec_file = tmp_path / "serve.yaml"
    spec_file.write_text(yaml.safe_dump({"storage": "shared", "models": [{"id": "tiny", "source": str(tiny_model)}]}))
    spec, base = load_serve_spec(spec_file)
    env = llm_configs(spec, base)[0]["runtime_env"]["env_vars"]
    assert env[compile_cache.STORE_ENV] == (tmp_path / "shared").resolve().as_uri()
    no_storage = spec.model_copy(update={"storage": None})
    assert compile_cache.STORE_ENV not in llm_configs(no_storage, base)[0]["runtime_env"]["env_vars"]


def test_a_relative_storage_path_is_refused_for_a_remote_head_naming_the_fix(tmp_path):
    from gpufleet.catalogue.errors import SpecError
    from gpufleet.serve_apps.remote import check_reachable
    from gpufleet.serve_apps.spec import ServeSpec

    spec = ServeSpec(storage="shared", models=[{"id": "m", "source": "llama-3.2-1b"}])
    with pytest.raises(SpecError, match=r"storage: shared is a folder .* use s3:// / gs:// or an absolute path"):
        check_reachable(spec, tmp_path)
    check_reachable(spec.model_copy(update={"storage": "s3://bucket/fleet"}), tmp_path)
