"""The plugin entry point and the loader's settings."""

import importlib.metadata

import pytest

from vllm_gds.errors import GdsError
from vllm_sources import RELEASES, run_on_sources
from vllm_gds.loader.options import LoaderOptions


def test_entry_point_is_declared_and_registration_is_idempotent(caplog):
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "vllm_gds"]
    assert entry.value == "vllm_gds:register"
    register = entry.load()
    register()
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, get_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from vllm_gds.loader.model_loader import GdsModelLoader

    guard = DefaultModelLoader._prepare_weights
    register()
    register()
    assert _LOAD_FORMAT_TO_MODEL_LOADER["gds"] is GdsModelLoader
    assert DefaultModelLoader._prepare_weights is guard  # not wrapped twice
    assert "already registered" not in caplog.text

    from vllm.config.load import LoadConfig

    loader = get_model_loader(LoadConfig(load_format="gds", model_loader_extra_config={"gds": "off"}))
    assert isinstance(loader, GdsModelLoader) and loader.options.read.policy == "off"


def test_extra_config_defaults():
    options = LoaderOptions.from_extra_config({})
    assert options.read.policy == "auto" and options.verify_checksums is True and options.report_dir is None


def test_unknown_extra_config_key_lists_the_known_ones():
    with pytest.raises(GdsError, match=r"unknown keys \['verify'\].*allowed: .*'gds'.*'verify_checksums'"):
        LoaderOptions.from_extra_config({"verify": False})


@pytest.mark.parametrize("extra, message", [
    ({"gds": "always"}, "gds policy 'always' is not one of auto, require, off"),
    ({"verify_checksums": "no"}, "verify_checksums must be true or false"),
])
def test_bad_extra_config_values(extra, message):
    with pytest.raises(GdsError, match=message):
        LoaderOptions.from_extra_config(extra)


def test_data_and_expert_parallel_layouts_are_refused():
    from vllm.config import ParallelConfig, VllmConfig

    from vllm_gds.loader.model_loader import check_supported_parallelism

    for parallel in (ParallelConfig(enable_expert_parallel=True), ParallelConfig(data_parallel_size=2)):
        with pytest.raises(GdsError, match="does not support data-parallel or expert-parallel layouts"):
            check_supported_parallelism(VllmConfig(parallel_config=parallel))
    check_supported_parallelism(VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=1)))


@pytest.mark.parametrize("minor", RELEASES)
def test_loader_registers_against_gpu_release_sources(minor):
    """The plugin's entry point, the `gds` load format and the loader's guard work on each GPU
    release (its Python files; no GPU here): register() idempotent, the tq dtypes registered."""
    run_on_sources(minor, """
        import vllm_gds
        from vllm.config.load import LoadConfig
        from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, get_model_loader
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.config.cache import get_kv_cache_dtype_handler
        from vllm_gds.loader.model_loader import GdsModelLoader
        vllm_gds.register()
        guard = DefaultModelLoader._prepare_weights
        vllm_gds.register()
        from vllm_gds.loader.model_loader import register_loaders
        from vllm_gds.kvcache.registration import register as register_kv_cache
        register_loaders()  # past register()'s own flag: each step is idempotent by itself
        assert register_kv_cache() is True
        assert DefaultModelLoader._prepare_weights is guard and guard._vllm_gds_guard
        assert _LOAD_FORMAT_TO_MODEL_LOADER["gds"] is GdsModelLoader
        loader = get_model_loader(LoadConfig(load_format="gds", model_loader_extra_config={"gds": "off"}))
        assert isinstance(loader, GdsModelLoader) and loader.options.read.policy == "off"
        for name in ("tq3", "tq4", "tq5"):
            assert get_kv_cache_dtype_handler(name) is not None, name
        print("OK")
    """)
