"""The pipeline's typed config (`PipelineConfig`) and its YAML files."""
from configs.schema import ConfigError, PipelineConfig, build_config, dump_config, load_config

__all__ = ["ConfigError", "PipelineConfig", "build_config", "dump_config", "load_config"]
