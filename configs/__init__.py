"""The pipeline's typed config (`PipelineConfig`) and its YAML files."""
from configs.schema import ConfigError, PipelineConfig, UserError, build_config, dump_config, load_config

__all__ = ["ConfigError", "UserError", "PipelineConfig", "build_config", "dump_config", "load_config"]
