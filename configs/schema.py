"""The one typed config of the pipeline.

`PipelineConfig` is loaded from YAML (`load_config`), can be overridden from the command line
(`key.sub=value`), and is the flows' single parameter, so the Prefect UI renders it as a form and
MLflow logs it flattened as params. Every field has a default that runs the CPU demo.

Every mistake in a config is a `ConfigError` (a `UserError`) whose one-line message names the field,
the override, or the file and line: settings that cannot train (a group of one, temperature 0, no
reward weight, NaN or infinite numbers) and run_ids that are not one plain folder name are refused
here, before anything runs. Config files are read as UTF-8 and their bytes are never echoed.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_serializer,
                      field_validator, model_validator)

# A run_id names a folder under <artifacts>/runs/: one plain path component, never a way out of it.
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


class _Section(BaseModel):
    # A typo'd key is an error, not a silently ignored setting; a NaN or infinite number (`grpo.lr=inf`)
    # is never a meaningful setting and would poison every step it touches.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModelConfig(_Section):
    """The built-in offline demo model (used when `model.policy` is "tiny")."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_position_embeddings: int = Field(256, gt=0)


class LoraConfig(_Section):
    """LoRA adapters through `peft`: only the adapters train; the reference is the base model with the
    adapters disabled (no second copy); checkpoints hold the adapters and their optimizer state."""

    enabled: bool = False
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description='module names to adapt (e.g. [q_proj, v_proj]) or "all-linear"')


class ModelConfig(_Section):
    policy: str = Field("tiny", description='"tiny" (built-in demo model), a hub id, a local path, or a registered '
                                            'version (models:/<name>@best, models:/<name>/<version>)')
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description='"cpu", "cuda", "cuda:1", ...')
    trust_remote_code: bool = False
    seed: int = 0
    autocast: Literal["none", "bfloat16", "float16", "auto"] = Field("none", description=(
        "matmuls of sampling, the update and SFT under torch.autocast in this dtype (auto: bfloat16 where "
        "the device multiplies bf16 natively: a GPU, a CPU with avx512_bf16 or AMX; else none); weights, optimizer "
        "and log-softmax stay in model.dtype / float32"))
    attn_implementation: str | None = Field(None, description=(
        'transformers attention kernel: "sdpa", "eager", "flash_attention_2", ...; default: the model\'s'))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass of the update and SFT: less memory, ~30% more time"))
    lora: LoraConfig = LoraConfig()
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


class PromptConfig(_Section):
    """How a question becomes the model's prompt, alike for sampling, evaluation, SFT and reward models."""

    format: Literal["auto", "plain", "chat"] = Field("auto", description=(
        'plain: "Question: ...\\nAnswer:\\n" (the built-in model, base models); chat: the tokenizer\'s chat '
        "template with the generation prompt; auto: chat when the tokenizer has a template"))
    system: str | None = Field(None, description="chat: a system message before the question")
    instruction: str | None = Field(None, description=(
        "chat: a line after the question saying how to answer (e.g. the form of the final answer)"))


class DataConfig(_Section):
    prompt_set: str = Field("arithmetic", description=(
        '"arithmetic" (built-in word problems), "gsm_symbolic" (reasoning-gym\'s GSM8K-derived problems), '
        "or a GSM8K-format .jsonl/.parquet path"))
    test_set: str | None = Field(None, description="GSM8K-format test file; default: split from prompt_set")
    train_size: int = Field(20000, gt=0)
    test_size: int = Field(500, gt=0)
    seed: int = 1234
    skip_malformed: bool = False
    arithmetic: ArithmeticConfig = ArithmeticConfig()


class SamplingConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    group_size: int = Field(8, description="G: outputs sampled per question (at least 2)",
                            json_schema_extra={"minimum": 2})
    temperature: float = Field(1.0, description="sampling temperature (above 0)", json_schema_extra={"exclusiveMinimum": 0})
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0, description="rows (prompt x sample) per generate call")
    threads: int | None = Field(None, gt=0, description=(
        "hf backend: torch CPU threads while it decodes (default: the run's `threads`). A decoding step's "
        "products are small; under OMP_WAIT_POLICY=PASSIVE every one of them wakes the other threads, and 1 "
        "thread decodes SmolLM2-135M's 16 rows faster than 2 (README, Speed settings)"))
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    vllm_sleep_between_steps: bool = False
    dynamic_sampling: bool = Field(False, description=(
        "DAPO's dynamic sampling: a step trains on loop.questions_per_step groups whose outputs scored "
        "differently, sampling rounds of as many new questions until it has them; groups that scored alike are "
        "never trained on. Off: the paper's one round per step"))
    dynamic_max_rounds: int = Field(3, gt=0, description=(
        "dynamic sampling: extra sampling rounds a step may take; a step still short of informative groups "
        "after them trains on those it has"))

    @field_validator("group_size")
    @classmethod
    def _group_has_peers(cls, g: int) -> int:
        if g < 2:
            raise ValueError("must be at least 2: GRPO's advantage compares each output with the others of its "
                             "group, and a group of one has nothing to compare with")
        return g

    @field_validator("temperature")
    @classmethod
    def _samples_can_differ(cls, t: float) -> float:
        if t <= 0:
            raise ValueError("must be above 0: at temperature 0 all G outputs of a group are the same greedy "
                             "output, so every advantage is 0 and nothing is learned")
        return t


BUILT_IN_REWARDS = ("verifier", "outcome_rm", "process_rm", "overlong")
# A pretrained reward model's label names its column, `reward_<label>`: a plain identifier.
REWARD_LABEL_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"


class RewardSource(_Section):
    # Declared before `name`: the check of `name` reads it (a label is a name only a pretrained model may have).
    model: str | None = Field(None, description=(
        "a pretrained reward model by hub id or local path (an AutoModelForSequenceClassification with one "
        "label, scoring prompt + completion); `name` is then your label for it, e.g. helpfulness"))
    name: str = Field(description=(
        "verifier, outcome_rm, process_rm, overlong, or your function as 'package.module:function' (README, "
        "Rewards): fn(prompts, completions, **fields) -> one float per completion, or one list per completion "
        "with a float per step; with `model`: a label of your choice (its column is reward_<label>)"))
    weight: float = Field(1.0, ge=0, description="a source's share of the reward (a negative one would reward "
                                                 "what the source scores as wrong)")
    trust_remote_code: bool = Field(False, description="with `model`: run the code its folder or hub repo ships")
    batch_size: int = Field(16, gt=0, description="with `model`: completions per forward pass of the reward model")

    @field_validator("name")
    @classmethod
    def _built_in_or_importable(cls, name: str, info: ValidationInfo) -> str:
        from stages.custom_rewards import is_function_path, load_reward_function

        if info.data.get("model") is not None:
            if name in BUILT_IN_REWARDS or not re.fullmatch(REWARD_LABEL_PATTERN, name):
                raise ValueError(f"{name!r}: a pretrained model's label must be a plain identifier (letters, digits, "
                                 f"'_') other than {', '.join(BUILT_IN_REWARDS)}: it names the column reward_<label>")
            return name
        if name in BUILT_IN_REWARDS:
            return name
        if not is_function_path(name):
            raise ValueError(f"{name!r}: not one of {', '.join(BUILT_IN_REWARDS)}, nor a function's import path "
                             "'package.module:function', nor the label of a source with a `model`")
        load_reward_function(name)
        return name


class VerifierConfig(_Section):
    last_number: bool = Field(False, description=(
        "when a completion has no answer line ('#### N', \\boxed{N}, 'the answer is N'), take its last number "
        "as the answer (for chat models that answer in prose)"))


class RewardConfig(_Section):
    supervision: Literal["outcome", "process"] = "outcome"
    sources: list[RewardSource] = [RewardSource(name="verifier")]
    on_error: Literal["fail", "zero"] = "fail"
    rm_score: Literal["probability", "logit"] = "probability"
    process_credit: Literal["sum", "min"] = Field("sum", description=(
        "process supervision: a token's advantage is the sum of the normalised rewards of the steps from its "
        "own on (the paper), or their minimum (PURE: a learned PRM's sum can be gamed by adding steps it likes)"))
    overlong_buffer: int = Field(16, gt=0, description=(
        "source overlong (DAPO's soft overlong punishment): its score falls linearly from 0 to -1 over the last "
        "this many tokens before sampling.max_new_tokens"))
    verifier: VerifierConfig = VerifierConfig()

    @field_validator("sources")
    @classmethod
    def _some_source_counts(cls, sources: list[RewardSource]) -> list[RewardSource]:
        if not sources:
            raise ValueError("empty: list at least one of verifier, outcome_rm, process_rm")
        if all(s.weight == 0 for s in sources):
            raise ValueError("every weight is 0, so every reward is 0 and nothing is learned")
        names = [s.name for s in sources]
        for s in sources:
            if s.model is not None and names.count(s.name) > 1:  # one column per label: two models would share it
                raise ValueError(f"{s.name!r} is listed twice: give each pretrained model a label of its own")
        return sources


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
    drop_flat_groups: bool = Field(False, description=(
        "train only on the groups whose outputs scored differently: the rest add no policy gradient (DAPO "
        "drops them), only a KL term and a share of the loss's denominator, at a forward and backward each"))
    mask_truncated: bool = Field(False, description=(
        "leave completions cut by sampling.max_new_tokens out of the loss (DAPO's overlong filtering); their "
        "rewards still count in their group's advantages"))
    importance_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "none", description=(
            "weight each token's surrogate by the trainer's probability of it over the sampler's (vLLM, bf16): "
            "per token or per output, capped at importance_cap (truncate) or dropped beyond it (mask); none: the "
            "paper's loss"))
    importance_cap: float = Field(3.0, gt=1, description="the importance weight's cap (TRL's default 3)")
    reference_while_sampling: bool = Field(False, description=(
        "iterative GRPO: score the outputs under the reference on a thread of their own while the hf sampler "
        "draws them, instead of in a reference forward of the update (the KL term's pi_ref; the rollouts' "
        "ref_logprobs). "
        "For a CPU whose decoding leaves a core free: pair it with sampling.threads below threads. Needs "
        "beta > 0, a full fine-tune (LoRA's reference is the policy itself), the hf sampler on the local "
        "backend and model.autocast: none (autocast is per thread)"))
    warn_after_flat_steps: int = Field(3, gt=0, description=(
        "a step whose groups all have one reward each learns nothing and takes no optimizer step; after this "
        "many in a row the run warns and its MLflow run is tagged"))


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
    eval_max_new_tokens: int | None = Field(None, gt=0, description="evaluation's token limit; default: "
                                                                    "sampling.max_new_tokens")
    eval_batch_size: int = Field(256, gt=0, description="rows per generate call of the held-out evaluation")


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


def masked_uri(uri: str) -> str:
    """`uri` with the password of its user info as `***` (postgresql://user:***@host/db): how the URI is
    written anywhere (config.yaml, MLflow params, Prefect parameters, logs)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<artifacts_root>/mlflow.db")
    experiment: str = "iterative-grpo"
    registered_model: str | None = Field(None, description=(
        "registry name of the policy's versions, one per iteration (default: the experiment's name); a "
        "learned reward model's are <name>-<source> (outcome_rm, process_rm)"))

    @field_serializer("mlflow_uri")
    def _without_password(self, uri: str | None) -> str | None:
        # Every dump (config.yaml, MLflow params, Prefect's record of the flow's parameters) is masked;
        # the run connects with the attribute itself (PipelineConfig.mlflow_uri).
        return None if uri is None else masked_uri(uri)

    @model_validator(mode="after")
    def _registry_name_allowed(self):
        # Checked here, not when the first iteration ends: MLflow refuses such a name only then.
        name = self.registry_name()
        if not name.strip() or any(c in name for c in "/:"):
            raise ValueError(f"registered_model: {name!r} cannot name a registered model (empty, or a '/' or ':' "
                             "in it)" + ("" if self.registered_model else "; it defaults to tracking.experiment: "
                                                                         "set tracking.registered_model"))
        return self

    def registry_name(self) -> str:
        """The registered model of the policy (`registered_model`, default the experiment's name)."""
        return self.registered_model or self.experiment


class StorageConfig(_Section):
    artifacts_root: str = "artifacts"


class ClusterConfig(_Section):
    """Where the sampler engines and the trainer run (tasks/cluster.py). `local`: in the flow's process, as
    always. `ray`: sampler replicas and an FSDP2 trainer group as Ray actors, driven by the same flow."""

    backend: Literal["local", "ray"] = "local"
    address: str = Field("", description='Ray cluster to join ("auto", "ray://head:10001"); empty: start a local '
                                         "Ray for the run")
    sampler_replicas: int = Field(1, gt=0, description="sampler engines; a step's questions are split across them")
    trainer_world_size: int = Field(1, gt=0, description="ranks of the FSDP2 trainer (gloo on CPU, NCCL on GPUs)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves for each sampler and each trainer rank")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs Ray reserves for each sampler and each trainer rank "
                                                         "(0 on CPU; 1 on a GPU cluster)")
    colocate: bool = Field(False, description="trainer rank k and sampler k share their GPUs (each asks for half "
                                              "of gpus_per_actor; with sampling.vllm_sleep_between_steps vLLM "
                                              "frees its memory while the trainer runs)")


class PipelineConfig(_Section):
    run_id: str | None = Field(None, description="names the run (its folder under runs/); re-using it resumes the run",
                               json_schema_extra={"pattern": f"^{RUN_ID_PATTERN}$"})
    algorithm: Literal["grpo", "ppo", "online_rft", "rft", "dpo", "sft"] = Field(
        "grpo", description="the unified paradigm's method (flows/compare_methods.py); iterative_grpo runs grpo")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
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
    cluster: ClusterConfig = ClusterConfig()
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")

    @field_validator("reward")
    @classmethod
    def _overlong_buffer_fits(cls, reward: RewardConfig, info: ValidationInfo) -> RewardConfig:
        sampling = info.data.get("sampling")  # absent when sampling itself is invalid (reported there)
        if sampling is not None and any(s.name == "overlong" for s in reward.sources) \
                and reward.overlong_buffer >= sampling.max_new_tokens:
            raise ValueError(f"overlong_buffer ({reward.overlong_buffer}) must be below sampling.max_new_tokens "
                             f"({sampling.max_new_tokens}): the penalty starts that many tokens before the limit")
        return reward

    @model_validator(mode="after")
    def _cluster_supports(self):
        if self.cluster.backend == "ray" and self.model.lora.enabled:
            raise ValueError("cluster.backend: ray trains full models only; model.lora.enabled needs the local backend")
        return self

    @model_validator(mode="after")
    def _reference_can_score_while_sampling(self):
        if not self.grpo.reference_while_sampling:
            return self
        conflicts = {"grpo.beta: 0 (no KL term, no reference)": self.grpo.beta == 0,
                     "model.lora.enabled (the reference is the policy with its adapters off)": self.model.lora.enabled,
                     f"sampling.backend: {self.sampling.backend}": self.sampling.backend != "hf",
                     f"cluster.backend: {self.cluster.backend}": self.cluster.backend != "local",
                     f"model.autocast: {self.model.autocast} (autocast is per thread)": self.model.autocast != "none"}
        bad = [what for what, clash in conflicts.items() if clash]
        if bad:
            raise ValueError(f"grpo.reference_while_sampling needs beta > 0, a full fine-tune, the hf sampler on the "
                             f"local backend and model.autocast: none; this config has {'; '.join(bad)}")
        return self

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_folder_name(cls, run_id: str | None) -> str | None:
        if run_id is not None and (not re.fullmatch(RUN_ID_PATTERN, run_id) or ".." in run_id):
            raise ValueError("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                             "(it names a folder under runs/: no path separators, no '..')")
        return run_id

    def artifacts(self) -> Path:
        return Path(self.storage.artifacts_root).resolve()

    def mlflow_uri(self) -> str:
        return self.tracking.mlflow_uri or f"sqlite:///{self.artifacts() / 'mlflow.db'}"

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
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])  # our validators' own words, without pydantic's "Value error, "
        else:
            msg = e["msg"]
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
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # a command-line argument that was not UTF-8 (surrogate escapes)
            shown = item.encode("utf-8", "backslashreplace").decode("utf-8")
            raise ConfigError(f"invalid override '{shown}': not valid UTF-8") from None
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        _set_dotted(out, key.strip(), value)
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's reason on one line, without the excerpt of the offending text its str() adds."""
    return " ".join(str(getattr(err, "problem", None) or getattr(err, "reason", None) or type(err).__name__).split())


def _yaml_line(err: yaml.YAMLError, text: str) -> int | None:
    """1-based line of a YAML error, when PyYAML knows where it is."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        return err.problem_mark.line + 1
    if isinstance(err, yaml.reader.ReaderError):
        return text.count("\n", 0, err.position) + 1
    return None


def read_config_file(path: str | Path) -> dict:
    """The mapping a YAML config file holds. Read as UTF-8; every failure is a `ConfigError` naming the
    file (and the line where there is one), never echoing the file's bytes."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"invalid config: {path}: cannot read ({err.strerror or type(err).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"invalid config: {path}:{line}: not valid UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = _yaml_line(err, text)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"invalid config: {where}: not valid YAML ({_yaml_problem(err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: {path} must hold a mapping at the top level")
    return data


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
    return build_config(read_config_file(path) if path is not None else {}, overrides)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
