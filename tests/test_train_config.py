"""``clipret train --config FILE``: every option's long name is a TOML key of its setting; the
switches that replace or continue a run are command-line only; unknown keys are refused in one line."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from clipret.cli import app
from clipret.config import COMMAND_LINE_ONLY, TrainConfig, read_toml
from clipret.errors import ClipretError

runner = CliRunner()


def _params() -> dict[str, Any]:
    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def _long_names(param: Any) -> list[str]:
    return [opt[2:] for opt in param.opts if opt.startswith("--")]


def _other_than_default(name: str, param: Any) -> Any:
    """A value of setting ``name`` that its default is not (cfg is captured before it is validated)."""
    default = param.default
    if isinstance(default, enum.Enum):
        return next(m.value for m in type(default) if m is not default)
    kind = TrainConfig.__dataclass_fields__[name].type
    if "bool" in kind:
        return not default
    if "int" in kind:
        return 3 if default is None else default + 3
    if "float" in kind:
        return 0.375
    return f"from-toml/{name}"  # root, out, model, pretrained, amp, device: strings as given


def _toml(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key} = {str(value).lower()}\n"
    return f'{key} = "{value}"\n' if isinstance(value, str) else f"{key} = {value!r}\n"


@pytest.fixture
def captured(monkeypatch) -> list[TrainConfig]:
    """The TrainConfig each `train` invocation would start a run with, through clipret.train (no run is started)."""
    seen: list[TrainConfig] = []

    def fake(cfg: TrainConfig, *, overwrite: bool, on_event: Any) -> dict[str, Any]:
        seen.append(cfg)
        return {"best_epoch": 1, "out": cfg.out}

    monkeypatch.setattr("clipret.training.loop.train", fake)
    return seen


def _train(tmp_path: Path, text: str, *args: str) -> Any:
    toml = tmp_path / "train.toml"
    toml.write_text(text)
    return runner.invoke(app, ["train", *args, "--config", str(toml)])


def _one_line(r: Any) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("form", ["dash", "underscore"])
def test_every_long_name_of_every_train_option_is_a_toml_key_of_its_setting(tmp_path, captured, form):
    checked = 0
    for name, param in _params().items():
        if name in COMMAND_LINE_ONLY:
            continue
        value = _other_than_default(name, param)
        for long in _long_names(param) if name != "root" else ["root"]:
            key = long if form == "dash" else long.replace("-", "_")
            r = _train(tmp_path, _toml(key, value), *([] if name == "root" else ["data"]))
            assert r.exit_code == 0, f"{key}: {r.output}"
            assert getattr(captured.pop(), name) == value, f"{key} = {value!r} did not set {name}"
            checked += 1
    assert checked == len(_params()) - len(COMMAND_LINE_ONLY) + 2  # --p/--classes-per-batch and --k/--images-per-class: two names each


def test_the_long_names_of_p_and_k_are_keys(tmp_path, captured):
    r = _train(tmp_path, "images-per-class = 6\nclasses_per_batch = 5\n", "data")
    assert r.exit_code == 0, r.output
    assert (captured[0].k, captured[0].p) == (6, 5)


@pytest.mark.parametrize("name", COMMAND_LINE_ONLY)
@pytest.mark.parametrize("form", ["dash", "underscore"])
def test_command_line_only_options_are_refused_in_a_file_in_one_line(tmp_path, captured, name, form):
    value = "other.toml" if name == "config" else True
    for long in _long_names(_params()[name]):
        key = long if form == "dash" else long.replace("-", "_")
        line = _one_line(_train(tmp_path, _toml(key, value), "data"))
        assert f"{key} is command-line only" in line and f"--{long}" in line and "on the command line" in line
    assert captured == []


@pytest.mark.parametrize("text, said", [
    ("images_per_clas = 4\n", "unknown setting(s) images_per_clas (did you mean images-per-class?)"),
    ("p = 4\nclasses-per-batch = 8\n", "p and classes-per-batch set the same setting; keep one of them"),
    ("image-size = 32\nimage_size = 64\n", "image-size and image_size set the same setting"),
])
def test_a_misspelt_or_repeated_key_is_refused_in_one_line(tmp_path, captured, text, said):
    assert said in _one_line(_train(tmp_path, text, "data"))
    assert captured == []


def test_a_key_with_no_near_match_is_refused_with_the_valid_keys(tmp_path, captured):
    line = _one_line(_train(tmp_path, "zzz = 1\n", "data"))
    assert "unknown setting(s) zzz; valid keys: " in line
    valid = line.split("valid keys: ")[1].split(", ")
    assert {"classes-per-batch", "images-per-class", "p", "k", "epochs", "root"} <= set(valid)
    assert not set(valid) & {"overwrite", "resume", "config"}
    assert captured == []


def test_read_toml_without_keys_takes_the_setting_names_and_refuses_overwrite(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("[train]\nembed-dim = 16\nk = 3\n")
    assert read_toml(toml) == {"embed_dim": 16, "k": 3}
    toml.write_text("overwrite = true\n")
    with pytest.raises(ClipretError, match="overwrite is command-line only"):
        read_toml(toml)
