"""One source of every default: the `igpt` options are the config dataclasses' fields, with their defaults,
types and docstrings, and a bad value is reported as the flag the user typed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from igpt_core import cli
from igpt_core.cli_options import Fields, field_default, options
from igpt_core.config import (
    DEFAULT_PRESET,
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    PaletteConfig,
    ProbeConfig,
    TokenizeConfig,
    TrainConfig,
    field_docs,
    preset,
)

CONFIGS = [PaletteConfig, TokenizeConfig, ModelConfig, TrainConfig, ProbeConfig, FinetuneConfig]
# The config whose fields each stage command exposes (pretrain's model fields are preset overrides).
COMMAND_CONFIGS = {
    "palette": PaletteConfig,
    "tokenize": TokenizeConfig,
    "pretrain": TrainConfig,
    "probe": ProbeConfig,
    "finetune": FinetuneConfig,
}
# The user-facing option names, as the README and ARCHITECTURE.md spell them.
OPTIONS = {
    "palette": "--source --clusters --method --resolution --seed --out --ray-address",
    "tokenize": "--palette --source --resolution --split --shard-size --out --ray-address",
    "pretrain": "--shards --preset --resolution --n-layer --n-head --n-embd --steps --batch-size --lr "
    "--warmup-steps --eval-every --checkpoint-every --workers --seed --precision --compile --palette --out "
    "--ray-address --json --ray-logs",
    "probe": "--checkpoint --train --test --layer --max-train --max-test --max-iter --precision --out",
    "finetune": "--checkpoint --train --test --objective --gen-weight --head-layer --flip --steps --batch-size "
    "--lr --warmup-steps --eval-every --val-fraction --max-train --max-test --workers --seed --from-scratch "
    "--precision --val --out --ray-address --json --ray-logs",
}


def command_params(name: str) -> dict[str, Any]:
    command = typer.main.get_command(cli.app).commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


class Called(Exception):
    """Raised by a stand-in for a stage so the test sees what the command passed it."""

    def __init__(self, positional: tuple[Any, ...], keywords: dict[str, Any]) -> None:
        super().__init__("called")
        self.positional, self.kwargs = positional, keywords


def stand_in(*args: Any, **kwargs: Any) -> Any:
    raise Called(args, kwargs)


def invoke(*args: str) -> Any:
    """The exception the command ended with (Called, ConfigError, SystemExit)."""
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exception is not None, result.output
    return result.exception


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_option_names_are_unchanged(command: str) -> None:
    names = [opt for p in command_params(command).values() for opt in (*p.opts, *p.secondary_opts)]
    assert names == OPTIONS[command].split()


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_cli_default_is_its_config_fields_default(command: str) -> None:
    cls = COMMAND_CONFIGS[command]
    docs = field_docs(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    params = {name: p for name, p in command_params(command).items() if name in fields}
    assert params, f"{command} exposes no {cls.__name__} field"
    for name, param in params.items():
        default = field_default(cls, name)
        assert param.default == (list(default) if isinstance(default, tuple) else default), name
        assert param.help == docs[name], name


def test_pretrain_model_options_override_the_preset_whose_default_is_model_configs() -> None:
    params = command_params("pretrain")
    assert params["preset_name"].default == DEFAULT_PRESET
    docs = field_docs(ModelConfig)
    for name in ("n_layer", "n_head", "n_embd"):
        assert params[name].default is None
        assert params[name].help == f"{docs[name]} Overrides the preset."
    # so a pretrain given no model flags builds ModelConfig's defaults
    assert preset(DEFAULT_PRESET) == ModelConfig()


def test_every_config_field_has_a_docstring() -> None:
    for cls in CONFIGS:
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert missing == set(), cls.__name__


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_becomes_an_option_whose_default_builds_the_default_config(cls: type) -> None:
    app = typer.Typer()
    built: dict[str, Any] = {}

    @app.command()
    @options(config=Fields(cls, tuple(f.name for f in dataclasses.fields(cls))))
    def command(config: Any) -> None:
        built["config"] = config

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    assert built["config"] == cls()


def generated_app() -> tuple[typer.Typer, dict[str, Any]]:
    app = typer.Typer()
    built: dict[str, Any] = {}

    @app.command()
    @options(
        train=Fields(TrainConfig, ("use_gpu", "compile", "precision", "workers", "batch_size")),
        probe=Fields(ProbeConfig, ("layer", "c_grid")),
        model=Fields(ModelConfig, ("n_layer", "dropout"), overrides="Overrides."),
    )
    def command(train: TrainConfig, probe: ProbeConfig, model: dict[str, Any]) -> None:
        built.update(train=train, probe=probe, model=model)

    return app, built


def test_each_field_type_parses_from_the_command_line() -> None:
    app, built = generated_app()
    args = "--use-gpu --compile --precision bf16 --layer all --c-grid 0.5 --c-grid 2 --n-layer 3"
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 0, result.output
    assert built["train"] == TrainConfig(use_gpu=True, compile=True, precision="bf16")
    assert built["probe"] == ProbeConfig(layer="all", c_grid=(0.5, 2.0))
    assert built["model"] == {"n_layer": 3}  # only the overrides given

    result = CliRunner().invoke(app, ["--no-use-gpu", "--layer", "3"])
    assert result.exit_code == 0, result.output
    assert built["train"].use_gpu is False and built["probe"].layer == 3


def test_a_literal_field_is_a_choice() -> None:
    app, _ = generated_app()
    result = CliRunner().invoke(app, ["--precision", "fp8"])
    assert result.exit_code == 2
    assert "--precision" in result.output and "fp8" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "x"], "--layer: expected an integer or 'all', got 'x'"),
        (["--workers", "4", "--batch-size", "2"], "--batch-size: 2 is smaller than workers=4"),
    ],
)
def test_config_errors_name_the_flag(args: list[str], message: str) -> None:
    app, _ = generated_app()
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == message


def test_commands_build_the_default_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("fit_palette", "run_tokenize", "run_pretrain", "run_probe"):
        monkeypatch.setattr(cli, name, stand_in)
    monkeypatch.setattr(cli, "read_meta", lambda shards: {"clusters": 16, "resolution": 8})

    assert invoke("palette").kwargs["config"] == PaletteConfig()
    tokenized = invoke("tokenize", "--palette", "pal").kwargs
    defaults = TokenizeConfig()
    assert (tokenized["resolution"], tokenized["split"], tokenized["shard_size"]) == (
        defaults.resolution,
        defaults.split,
        defaults.shard_size,
    )
    pretrained = invoke("pretrain", "--shards", "shards").kwargs
    assert pretrained["train"] == TrainConfig()
    assert pretrained["model"] == ModelConfig(vocab_size=16, resolution=8)
    assert invoke("probe", "--checkpoint", "c", "--train", "a", "--test", "b").positional[3] == ProbeConfig()


def test_commands_report_config_errors_as_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "read_meta", lambda shards: {"clusters": 16, "resolution": 8})
    monkeypatch.setattr(cli, "run_pretrain", stand_in)

    error = invoke("palette", "--clusters", "1")
    assert str(error) == "--clusters: must be in [2, 65535], got 1"
    error = invoke("probe", "--checkpoint", "c", "--train", "a", "--test", "b", "--layer", "-1")
    assert str(error) == "--layer: expected an integer or 'all', got '-1'"
    error = invoke("pretrain", "--shards", "s", "--preset", "huge")
    assert str(error).startswith("--preset: unknown preset 'huge'")
    error = invoke("pretrain", "--shards", "s", "--n-head", "3")
    assert str(error) == "--n-embd: 128 is not divisible by n_head=3"


def test_help_imports_no_heavy_dependency() -> None:
    """`igpt --help` stays fast: torch, Ray, Prefect and MLflow load only when a stage runs."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from igpt_core.cli import app\n"
        "for args in (['--help'], ['pretrain', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "heavy = ('torch', 'ray', 'prefect', 'mlflow', 'transformers', 'pyarrow')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
