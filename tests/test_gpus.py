"""GPU table: dtype choice by compute capability, lookup."""

import pytest

from gpufleet.catalogue.errors import SpecError
from gpufleet.catalogue.gpus import GPU_TYPES, get_gpu


@pytest.mark.parametrize("name", ["P4", "T4", "V100-32GB"])
def test_pre_ampere_gpus_train_in_fp16(name):
    assert get_gpu(name).train_dtype == "float16"


@pytest.mark.parametrize("name", ["A10G", "A100-40GB", "L4", "H100-80GB", "H200", "RTX-4090", "L40S"])
def test_ampere_and_newer_train_in_bf16(name):
    assert get_gpu(name).train_dtype == "bfloat16"


def test_table_covers_the_required_gpus():
    required = {"H200", "H100-80GB", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "T4", "V100-32GB", "P4", "RTX-4090"}
    assert required <= set(GPU_TYPES)


def test_lookup_by_alias_is_case_insensitive():
    assert get_gpu("h100").name == "H100-80GB"


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(SpecError, match="unknown GPU type 'K9000'.*H100-80GB"):
        get_gpu("K9000")
