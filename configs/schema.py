"""The one typed config of the pipeline.

`PipelineConfig` is loaded from YAML (`load_config`), can be overridden from the command line
(`key.sub=value`), and is the flows' single parameter, so the Prefect UI renders it as a form and
MLflow logs it flattened as params. Every field has a default that runs the CPU demo.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    # A typo'd key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """The built-in offline demo model (used when `model.policy` is "tiny")."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_position_embeddings: int = Field(256, gt=0)


class ModelConfig(_Section):
    policy: str = Field("tiny", description='"tiny" (built-in demo model), a hub id, or a local path')
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description='"cpu", "cuda", "cuda:1", ...')
    trust_remote_code: bool = False
    seed: int = 0
    autocast: Literal["none", "bfloat16", "float16"] = Field("none", description=(
        "matmuls of sampling, the update and SFT under torch.autocast in this dtype; weights, optimizer "
        "and log-softmax stay in model.dtype / float32"))
    attn_implementation: str | None = Field(None, description=(
        'transformers attention kernel: "sdpa", "eager", "flash_attention_2", ...; default: the model\'s'))
    tiny: TinyModelConfig = TinyModelConfig()

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `models.loading.load_policy` for this config."""
        return dict(dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code,
                    attn_implementation=self.attn_implementation)

    def compute(self):
        """The autocast context the policy's forward and backward passes run in."""
        from models.loading import matmul_autocast

        return matmul_autocast(self.device, self.autocast)


class ArithmeticConfig(_Section):
    """Difficulty knobs of the synthetic word-problem task."""

    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(3, ge=1)
    max_operand: int = Field(10, ge=2)
    max_multiplier: int = Field(5, ge=2)
    max_intermediate: int = Field(150, ge=10)

    @model_validator(mode="after")
    def _steps_ordered(self):
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must be <= max_steps")
        return self


class DataConfig(_Section):
    prompt_set: str = Field("arithmetic", description='"arithmetic" (built-in) or a GSM8K-format .jsonl/.parquet path')
    test_set: str | None = Field(None, description="GSM8K-format test file; default: split from prompt_set")
    train_size: int = Field(20000, gt=0)
    test_size: int = Field(500, gt=0)
    seed: int = 1234
    skip_malformed: bool = False
    arithmetic: ArithmeticConfig = ArithmeticConfig()


class SamplingConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    group_size: int = Field(8, gt=0, description="G: outputs sampled per question")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0, description="rows (prompt x sample) per generate call")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    vllm_sleep_between_steps: bool = False


class RewardSource(_Section):
    name: Literal["verifier", "outcome_rm", "process_rm"]
    weight: float = 1.0


class RewardConfig(_Section):
    supervision: Literal["outcome", "process"] = "outcome"
    sources: list[RewardSource] = [RewardSource(name="verifier")]
    on_error: Literal["fail", "zero"] = "fail"
    rm_score: Literal["probability", "logit"] = "probability"


class GRPOConfig(_Section):
    lr: float = Field(3e-5, gt=0)
    beta: float = Field(0.04, ge=0)
    eps_low: float = Field(0.2, gt=0)
    eps_high: float | None = Field(None, gt=0)
    mu: int = Field(1, gt=0, description="policy updates per sampled batch")
    aggregation: Literal["sequence", "token", "dr_grpo"] = "sequence"
    adv_eps: float = Field(1e-4, gt=0)
    adv_scale: Literal["group", "batch", "none"] = "group"
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(64, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class PPOConfig(_Section):
    """PPO (algorithm: ppo): a value model (a value head on a copy of the policy backbone) and GAE.

    gamma = lam = 1.0 is the usual choice for LLM PPO with one outcome reward at the last token (as
    in TRL's defaults and InstructGPT-style RLHF): no discounting inside an output, and the advantage
    is the Monte-Carlo return minus the value baseline. The KL to the reference is in the per-token
    reward with coefficient `grpo.beta` (models.methods.ppo_token_rewards)."""

    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    value_lr: float = Field(1e-3, gt=0, description="the value model's AdamW learning rate")
    value_clip: float = Field(0.2, gt=0, description="clip of the value update around the sampling-time values")
    whiten_advantages: bool = True


class DPOConfig(_Section):
    beta: float = Field(0.1, gt=0, description="DPO's inverse temperature (implicit reward scale)")


class IterationsConfig(_Section):
    iterations: int = Field(2, gt=0, description="I: outer iterations (reference refresh + RM retrain)")
    steps_per_iteration: int = Field(50, gt=0, description="M: GRPO steps per iteration")
    questions_per_step: int = Field(8, gt=0)
    eval_every: int = Field(25, gt=0)
    # Pass@K / Maj@K at each evaluation (DeepSeekMath section 5.2.2): RL tends to lift Maj@K towards
    # Pass@K, so their gap to greedy accuracy is the headroom sharpening alone can give.
    eval_samples: int = Field(8, ge=0, description="K samples per question (at sampling.temperature) for Pass@K "
                                                   "and Maj@K at each evaluation; 0: greedy accuracy only")
    eval_sample_questions: int = Field(64, ge=0, description="how many held-out questions (the first ones) get "
                                                             "the K samples; greedy accuracy uses all of them")
    checkpoint_every: int = Field(1, gt=0)


class RewardModelConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(64, gt=0)
    replay_ratio: float = Field(0.1, ge=0, lt=1)
    freeze_backbone: bool = False
    init_samples_per_question: int = Field(4, gt=0)
    init_questions: int = Field(512, gt=0)
    retrain_each_iteration: bool = Field(True, description="False: train once before RL and keep it frozen")


class SFTConfig(_Section):
    steps: int = Field(1200, ge=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(200, gt=0, description=(
        "SFT steps between resumable checkpoints (model, optimizer, schedule, data order); a killed "
        "warm start resumes from the last one"))
    examples: int | None = Field(None, gt=0, description=(
        "worked solutions SFT learns from (the first N of the train split; default: all). RL needs only "
        "the final answers, so it draws its questions from the whole split"))
    answer_only_fraction: float = Field(0.0, ge=0, le=1, description=(
        "fraction of those worked solutions shown as their final answer line alone ('#### N'), like the "
        "terse solutions in real SFT corpora; which ones is fixed by data.seed. Imitation learns the mix of "
        "styles; RL's reward tells them apart"))


class ControlConfig(_Section):
    """A control that shows RL is doing the work: the same CPU time spent continuing SFT."""

    sft_same_time: bool = Field(False, description=(
        "after RL, continue SFT (same worked solutions) from the same start for RL's CPU time"))


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<artifacts_root>/mlflow.db")
    experiment: str = "iterative-grpo"


class StorageConfig(_Section):
    artifacts_root: str = "artifacts"


class PipelineConfig(_Section):
    run_id: str | None = Field(None, description="names the run; re-using it resumes the run")
    algorithm: Literal["grpo", "ppo", "online_rft", "rft", "dpo", "sft"] = Field(
        "grpo", description="the unified paradigm's method (flows/compare_methods.py); iterative_grpo runs grpo")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    grpo: GRPOConfig = GRPOConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    loop: IterationsConfig = IterationsConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    control: ControlConfig = ControlConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")

    def artifacts(self) -> Path:
        return Path(self.storage.artifacts_root).resolve()

    def mlflow_uri(self) -> str:
        return self.tracking.mlflow_uri or f"sqlite:///{self.artifacts() / 'mlflow.db'}"

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of some sections, to key reusable outputs (data splits, SFT model)."""
        blob = json.dumps({s: getattr(self, s).model_dump() for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, for MLflow params."""
        return _flatten(self.model_dump())


class UserError(ValueError):
    """A mistake the user can fix (a bad field, file, or run_id): the command line prints its one-line
    message and exits 2, and Prefect tasks do not retry it."""


class ConfigError(UserError):
    """A bad config: the message names the field path."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{path}: {msg}")
    return "invalid config: " + "; ".join(parts)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"invalid override {dotted!r}: {k} is not a section")
    d[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["grpo.lr=1e-5", "loop.iterations=3"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected key.sub=value")
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    merged = _merge(data or {}, parse_overrides(overrides or []))
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.sub=value` overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid config: {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must hold a mapping at the top level")
    return build_config(data, overrides)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
