"""Every input a user can get wrong fails before any flow starts: a `UserError` whose message names the
field or file (and line), and on the command line one `error: ...` line on stderr and exit code 2,
never a traceback and never the bytes of an undecodable file."""
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from configs import ConfigError, PipelineConfig, UserError, load_config
from flows.cli import config_from_args, config_parser, preflight
from models.loading import ModelSourceError, check_model_source
from problems.datasets import load_splits, prepare_splits, read_problems
from problems.gsm8k import DatasetError, load_gsm8k

ROOT = Path(__file__).resolve().parents[1]


def cli_error(capsys, *argv: str) -> str:
    """The one stderr line of a command line that must be refused (exit code 2)."""
    assert config_from_args(config_parser(None).parse_args(list(argv))) is None  # main() returns 2 on None
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert err.isascii() or all(c.isprintable() for c in err[:-1]), err
    return err[len("error: "):-1]


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


def write_gsm8k(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def problems(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i} plus 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(start, start + n)]


def test_every_error_here_is_a_user_error():
    assert issubclass(ConfigError, UserError) and issubclass(DatasetError, UserError)
    assert issubclass(ModelSourceError, UserError)


# 1, 2: sampling settings that make every group-relative advantage 0 -------------------------------------
@pytest.mark.parametrize("g", ["1", "0", "-3"])
def test_group_of_one_is_refused(capsys, g):
    line = cli_error(capsys, f"sampling.group_size={g}")
    assert line.startswith("invalid config: sampling.group_size: must be at least 2: ")
    assert "group" in line.split("at least 2:")[1]


def test_group_of_two_is_enough():
    assert load_config(None, ["sampling.group_size=2"]).sampling.group_size == 2


@pytest.mark.parametrize("t", ["0", "0.0", "-0.5"])
def test_temperature_zero_is_refused_saying_why(capsys, t):
    line = cli_error(capsys, f"sampling.temperature={t}")
    assert line.startswith("invalid config: sampling.temperature: must be above 0: ")
    assert "all G outputs of a group are the same greedy output" in line


# 3: reward sources ------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight,msg", [
    ("-1", "greater than or equal to 0"), (".nan", "a finite number"), (".inf", "a finite number"),
    ("-.inf", "a finite number"),
])
def test_bad_source_weight_is_refused(weight, msg):
    line = config_error(f"reward.sources=[{{name: verifier}}, {{name: outcome_rm, weight: {weight}}}]")
    assert line == f"invalid config: reward.sources.1.weight: Input should be {msg}"


def test_all_zero_weights_and_no_sources_are_refused():
    assert config_error("reward.sources=[{name: verifier, weight: 0}, {name: outcome_rm, weight: 0.0}]") == (
        "invalid config: reward.sources: every weight is 0, so every reward is 0 and nothing is learned")
    assert config_error("reward.sources=[]").startswith("invalid config: reward.sources: empty: ")
    # one source at 0 next to a positive one is a legitimate ablation
    assert load_config(None, ["reward.sources=[{name: verifier}, {name: outcome_rm, weight: 0}]"])


# 4: no NaN or infinity anywhere ------------------------------------------------------------------------
def _float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if typing.get_origin(field.annotation) is list:
            continue  # reward.sources: its weights have their own tests
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        nested = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if nested:
            out += _float_fields(nested[0], f"{prefix}{name}.")
        elif float in kinds:
            out.append(prefix + name)
    return out


FLOAT_FIELDS = _float_fields(PipelineConfig)


def test_the_float_fields_are_found():
    assert {"grpo.lr", "grpo.eps_high", "sampling.temperature", "ppo.gamma", "reward_model.replay_ratio"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_no_float_field_takes_nan_or_inf(field, value):
    assert config_error(f"{field}={value}") == f"invalid config: {field}: Input should be a finite number"


def test_lr_inf_on_the_command_line(capsys):
    assert cli_error(capsys, "grpo.lr=inf") == "invalid config: grpo.lr: Input should be a finite number"


# 5: run_id names one folder under runs/ ---------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../outside", "a/b", "..", "a..b", "/abs", "a\\b", "''", ".hidden", "x" * 129])
def test_run_id_cannot_leave_runs(run_id):
    assert config_error(f"run_id={run_id}").startswith("invalid config: run_id: must be 1-128 letters, digits")


@pytest.mark.parametrize("run_id", ["run-20260101-120000-abc123", "bench.v1_x", "A", "x" * 128])
def test_plain_run_ids_pass(run_id):
    assert load_config(None, [f"run_id={run_id}"]).run_id == run_id


def test_bad_run_id_on_the_command_line_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_error(capsys, "run_id=../outside").startswith("invalid config: run_id: ")
    assert list(tmp_path.iterdir()) == []


# 6: config files that cannot be read ----------------------------------------------------------------
def test_non_utf8_config_names_file_and_line_without_its_bytes(capsys, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"grpo:\n  lr: 1.0e-5\n# caf\xe9 \xff\xfe\n")
    line = cli_error(capsys, "--config", str(bad))
    assert line == f"invalid config: {bad}:3: not valid UTF-8"


def test_config_that_is_a_directory_or_missing(capsys, tmp_path):
    assert cli_error(capsys, "--config", str(tmp_path)) == f"invalid config: {tmp_path}: cannot read (Is a directory)"
    missing = tmp_path / "nope.yaml"
    assert cli_error(capsys, "--config", str(missing)) == (
        f"invalid config: {missing}: cannot read (No such file or directory)")


def test_bad_yaml_names_the_line(capsys, tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("grpo:\n  lr: 1.0e-5\nsampling: [1,\n")
    assert cli_error(capsys, "--config", str(bad)).startswith(f"invalid config: {bad}:4: not valid YAML (")
    bad.write_text("grpo:\n  lr: 1\x00\n")
    assert cli_error(capsys, "--config", str(bad)) == (
        f"invalid config: {bad}:2: not valid YAML (special characters are not allowed)")


def test_control_characters_and_undecodable_arguments_stay_on_one_escaped_line(capsys, tmp_path):
    odd = tmp_path / "a\nb\x1b[31m.yaml"
    assert cli_error(capsys, "--config", str(odd)).endswith("a\\nb\\x1b[31m.yaml: cannot read (No such file or directory)")
    # an argument that was not valid UTF-8 reaches Python with surrogate escapes
    assert cli_error(capsys, "gr\udcffpo.lr=1") == "invalid override 'gr\\udcffpo.lr=1': not valid UTF-8"


# 7: an override whose value is not YAML ---------------------------------------------------------------
def test_override_that_is_not_yaml(capsys):
    line = cli_error(capsys, "grpo.lr=[1,")
    assert line.startswith("invalid override 'grpo.lr=[1,': the value is not valid YAML (")


# 8: model.policy --------------------------------------------------------------------------------------
def _model_folder(root: Path, *files: str) -> Path:
    root.mkdir()
    for name in files:
        (root / name).write_text("{}")
    return root


@pytest.mark.parametrize("policy", ["/no/such/model", "./no-such-model", "~/no-such-model-xyz", "runs/a/policy"])
def test_missing_local_model_path(policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as err:
        check_model_source(policy)
    assert str(err.value) == f"model.policy: {policy}: no such folder"


@pytest.mark.parametrize("policy", ["tiny", "Qwen/Qwen2.5-0.5B-Instruct", "gpt2"])
def test_builtin_and_hub_ids_pass(policy, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)  # no local folder of that name
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a user who may download
    check_model_source(policy)


def test_a_hub_id_not_in_the_cache_is_refused_offline(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    check_model_source("tiny")
    with pytest.raises(ModelSourceError) as err:
        check_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    assert str(err.value).startswith("model.policy: hub id 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging "
                                     "Face cache and HF_HUB_OFFLINE=1")
    assert "\n" not in str(err.value)


def test_model_folder_missing_files(tmp_path):
    no_tok = _model_folder(tmp_path / "no_tok", "config.json", "model.safetensors")
    with pytest.raises(ModelSourceError) as err:
        check_model_source(str(no_tok))
    assert str(err.value) == f"model.policy: {no_tok} has no tokenizer (tokenizer.json or tokenizer_config.json missing)"
    no_cfg = _model_folder(tmp_path / "no_cfg", "tokenizer.json", "model.safetensors")
    with pytest.raises(ModelSourceError, match=r"^model\.policy: .*no_cfg has no config\.json$"):
        check_model_source(str(no_cfg))
    no_weights = _model_folder(tmp_path / "no_weights", "config.json", "tokenizer_config.json")
    with pytest.raises(ModelSourceError, match=r"no_weights has no weights \("):
        check_model_source(str(no_weights))
    a_file = tmp_path / "model.bin"
    a_file.write_text("")
    with pytest.raises(ModelSourceError, match=r"model\.bin is not a folder"):
        check_model_source(str(a_file))
    check_model_source(str(_model_folder(tmp_path / "ok", "config.json", "tokenizer.json", "model-00001-of-00002.safetensors")))


def test_model_path_on_the_command_line(capsys, tmp_path):
    folder = _model_folder(tmp_path / "m", "config.json", "pytorch_model.bin")
    assert cli_error(capsys, f"model.policy={folder}") == (
        f"model.policy: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json missing)")


# 9, 10: GSM8K-format data -----------------------------------------------------------------------------
def test_edited_dataset_makes_new_splits(tmp_path):
    data = write_gsm8k(tmp_path / "train.jsonl", problems(6))
    cfg = load_config(None, [f"data.prompt_set={data}", "data.test_size=2"]).data
    train1, test1 = prepare_splits(cfg, tmp_path / "splits")
    write_gsm8k(data, problems(6, start=100))  # same name, same config, new content
    train2, test2 = prepare_splits(cfg, tmp_path / "splits")
    assert train2.parent != train1.parent
    assert read_problems(test2)[0]["answer"] == "101" and read_problems(test1)[0]["answer"] == "1"
    assert prepare_splits(cfg, tmp_path / "splits") == (train2, test2)  # unchanged content: reused


def test_edited_test_set_makes_new_splits(tmp_path):
    train = write_gsm8k(tmp_path / "train.jsonl", problems(4))
    test = write_gsm8k(tmp_path / "test.jsonl", problems(2, start=50))
    cfg = load_config(None, [f"data.prompt_set={train}", f"data.test_set={test}"]).data
    first, _ = prepare_splits(cfg, tmp_path / "splits")
    write_gsm8k(test, problems(2, start=60))
    second, test_path = prepare_splits(cfg, tmp_path / "splits")
    assert first.parent != second.parent and read_problems(test_path)[0]["answer"] == "61"


def test_non_utf8_dataset_names_file_and_line(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(problems(1)[0]).encode() + b"\n" + b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    with pytest.raises(DatasetError) as err:
        load_gsm8k(data)
    assert str(err.value) == f"{data}:2: not valid UTF-8"
    assert len(load_gsm8k(data, skip_malformed=True)) == 1
    assert cli_error(capsys, f"data.prompt_set={data}") == f"data.prompt_set: {data}:2: not valid UTF-8"


def test_utf8_dataset_reads_as_utf8(tmp_path):
    data = write_gsm8k(tmp_path / "d.jsonl", [{"question": "Zoë has 2 crêpes, 1 more?", "answer": "2+1=3\n#### 3"}])
    assert load_gsm8k(data)[0]["question"] == "Zoë has 2 crêpes, 1 more?"


def test_malformed_row_is_named_by_field_file_and_line(capsys, tmp_path):
    data = write_gsm8k(tmp_path / "d.jsonl", [*problems(3), {"question": "Q?", "answer": "no mark"}])
    assert cli_error(capsys, f"data.prompt_set={data}", "data.test_size=1") == (
        f"data.prompt_set: {data}:4: answer has no '####' line")
    cfg = load_config(None, [f"data.prompt_set={data}", "data.test_size=1", "data.skip_malformed=true"])
    preflight(cfg)
    train, test = load_splits(cfg.data)
    assert len(train) == 2 and len(test) == 1


@pytest.mark.parametrize("make,msg", [
    (lambda p: None, "cannot read (No such file or directory)"),
    (lambda p: p.mkdir(), "cannot read (Is a directory)"),
])
def test_missing_or_directory_dataset(tmp_path, make, msg):
    path = tmp_path / "d.jsonl"
    make(path)
    with pytest.raises(DatasetError) as err:
        prepare_splits(load_config(None, [f"data.prompt_set={path}"]).data, tmp_path / "splits")
    assert str(err.value) == f"data.prompt_set: {path}: {msg}"


def test_unreadable_parquet_and_too_few_problems(tmp_path):
    fake = tmp_path / "d.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DatasetError, match=rf"^data\.prompt_set: {fake}: not a readable Parquet file$"):
        preflight(load_config(None, [f"data.prompt_set={fake}"]))
    few = write_gsm8k(tmp_path / "few.jsonl", problems(3))
    with pytest.raises(DatasetError, match=r"^data\.prompt_set: .*few\.jsonl: too few problems .*data\.test_size is 500"):
        preflight(load_config(None, [f"data.prompt_set={few}"]))


# the real command line ---------------------------------------------------------------------------------
def test_flow_command_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampling:\n  group_size: 1\n")
    proc = subprocess.run([sys.executable, "-m", "flows.iterative_grpo", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: invalid config: sampling.group_size: ")
    assert proc.stdout == ""
