"""The typed config: YAML loading, overrides, and one-line errors that name the field."""
import pytest

from configs import ConfigError, PipelineConfig, load_config


def test_defaults_are_the_papers_where_it_has_one():
    cfg = PipelineConfig()
    assert cfg.grpo.beta == 0.04 and cfg.grpo.eps_low == 0.2 and cfg.grpo.mu == 1
    assert cfg.grpo.aggregation == "sequence" and cfg.grpo.adv_eps == 1e-4
    assert cfg.reward_model.replay_ratio == 0.1


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  group_size: 4\ngrpo:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["grpo.beta=0", "loop.iterations=3", "reward.supervision=process"])
    assert cfg.sampling.group_size == 4 and cfg.grpo.lr == 1e-5
    assert cfg.grpo.beta == 0 and cfg.loop.iterations == 3 and cfg.reward.supervision == "process"


def test_typo_key_is_rejected_naming_the_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  grup_size: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == "invalid config: sampling.grup_size: unknown field"
    assert "\n" not in str(err.value)


def test_negative_group_size_is_rejected_naming_the_field():
    with pytest.raises(ConfigError, match=r"^invalid config: sampling\.group_size: must be at least 2: "):
        load_config(None, ["sampling.group_size=-1"])


@pytest.mark.parametrize("override,field", [
    ("sampling.backend=tpu", "sampling.backend"),
    ("reward.sources=[{name: oracle}]", "reward.sources.0.name"),
    ("reward_model.replay_ratio=1.5", "reward_model.replay_ratio"),
    ("data.arithmetic.min_steps=5", "data.arithmetic"),
])
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=rf"invalid config: {field.replace('.', '[.]')}"):
        load_config(None, [override])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["grpo.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shipped_configs_load():
    demo = load_config("configs/demo.yaml")
    gpu = load_config("configs/gsm8k-qwen2.5-0.5b.yaml")
    assert demo.model.policy == "tiny"
    assert gpu.sampling.backend == "vllm" and gpu.grpo.beta == 0.04 and gpu.grpo.lr == 1e-6
    lora = load_config("configs/gsm8k-qwen2.5-1.5b-lora.yaml")
    assert lora.model.lora.enabled and lora.prompt.format == "chat" and lora.sft.steps == 0
    cpu = load_config("configs/smollm2-cpu.yaml")
    assert cpu.model.lora.enabled and cpu.prompt.format == "chat" and cpu.reward.verifier.last_number


def test_flat_view_for_mlflow_params():
    flat = PipelineConfig().flat()
    assert flat["grpo.beta"] == 0.04 and flat["model.tiny.hidden_size"] == 128


@pytest.mark.parametrize("conflict,named", [
    ("grpo.beta=0", "grpo.beta: 0"), ("model.lora.enabled=true", "model.lora.enabled"),
    ("sampling.backend=vllm", "sampling.backend: vllm"), ("cluster.backend=ray", "cluster.backend: ray"),
    ("model.autocast=auto", "model.autocast: auto"),
])
def test_reference_while_sampling_names_what_it_cannot_run_with(conflict, named):
    load_config(None, ["grpo.reference_while_sampling=true"])  # the defaults: a full fine-tune, hf, local, fp32
    with pytest.raises(ConfigError, match=rf"grpo.reference_while_sampling needs .*; this config has {named}"):
        load_config(None, ["grpo.reference_while_sampling=true", conflict])
