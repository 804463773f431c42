"""An option the user sets that does nothing with the others chosen (e.g. --ema-decay with --no-ema) is named in
one line on stderr, with what it needs; it is not used and not logged. The cases are generated from the config
dataclasses' ``applies`` predicates, so a new conditional option cannot be forgotten."""
from __future__ import annotations

import dataclasses

import pytest

from cli import cli
from conftest import invoke
from core.options import opt

# settings that switch conditional options off; each generated case takes the first that makes its option not apply
OFF = [{}, {"quantizer": "fsq"}, {"ema": False}, {"entropy_weight": 0.0}, {"perceptual_weight": 0.0},
       {"max_steps": 10}, {"lr_schedule": "constant"}, {"cache": False}]
REQUIRED = {"train-vqvae": ["--manifest", "images.csv"], "generate": ["--transformer-run-id", "0" * 32],
            "evaluate": ["--vqvae-run-id", "0" * 32]}


def _args(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


def _cases() -> list:
    cases = []
    for command, command_obj in sorted(cli.commands.items()):
        cls = getattr(command_obj.callback, "config_class", None)
        for f in dataclasses.fields(cls) if cls else ():
            if "applies" in f.metadata:
                cases.append(pytest.param(command, cls, f, id=f"{command}--{f.name}"))
    return cases


def _value(f: dataclasses.Field):
    """A value to set: the default, or (no default) something that makes the option do something."""
    return f.default if f.default is not None else {"context_fraction": 0.5}.get(f.name, "x.npz")


@pytest.fixture
def no_work(monkeypatch):
    """The stage functions replaced: these tests are about what the command says before any work."""
    import transformer.generate
    import vqvae.train

    monkeypatch.setattr(vqvae.train, "train_vqvae", lambda *a, **k: None)
    monkeypatch.setattr(transformer.generate, "run_generate", lambda *a, **k: None)


@pytest.mark.parametrize("command,cls,field", _cases())
def test_an_option_set_where_it_does_nothing_is_named_with_what_it_needs(command, cls, field, tracking_dir,
                                                                         no_work):
    assert command in REQUIRED, f"add the required options of {command} to REQUIRED"
    base = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    names = {f.name for f in dataclasses.fields(cls)}
    off = next((o for o in OFF if set(o) <= names
                and not field.metadata["applies"](dataclasses.replace(cls(**base), **o))), None)
    assert off is not None, f"no setting in OFF switches --{field.name} off: add one"
    args = [command, *REQUIRED[command]]
    for name, value in off.items():
        args += _args(name, value)
    res = invoke(*args, *_args(field.name, _value(field)))
    flag = "--" + field.name.replace("_", "-")
    assert "ignored (not used, not logged): " in res.stderr, res.output
    assert f"{flag} (needs {field.metadata['needs']})" in res.stderr, res.stderr
    assert "Traceback" not in res.output
    # where it applies (the defaults), setting it says nothing
    res = invoke(command, *REQUIRED[command], *_args(field.name, _value(field)))
    if field.metadata["applies"](cls(**base)):
        assert "ignored" not in res.stderr, res.stderr


def test_only_the_options_the_user_set_are_named(tracking_dir, no_work):
    # --no-ema leaves --ema-decay at its default, unset: nothing to say; the GAN options likewise at 10 steps
    res = invoke("train-vqvae", "--manifest", "images.csv", "--no-ema", "--max-steps", "10")
    assert res.exit_code == 0 and "ignored" not in res.stderr, res.output
    res = invoke("train-vqvae", "--manifest", "images.csv", "--no-ema", "--ema-decay", "0.9", "--max-steps", "10",
                 "--disc-ch", "32", "--disc-start", "5")  # the GAN starts at step 5 of 10: --disc-ch applies
    assert res.exit_code == 0, res.output
    assert [line for line in res.stderr.splitlines() if line.startswith("note:")] == [
        "note: ignored (not used, not logged): --ema-decay (needs --quantizer vq with --ema)"]


def test_pipeline_names_what_its_config_sets_in_vain_before_any_work(tracking_dir, tmp_path):
    res = invoke("pipeline", "--manifest", tmp_path / "missing.csv", "--set", "vqvae.quantizer=fsq",
                 "--set", "vqvae.codebook-size=512", "--set", "generate.context-fraction=0.3")
    assert res.exit_code == 1 and "manifest not found" in res.output, res.output
    assert ("note: [vqvae] ignored (not used, not logged): --codebook-size (needs --quantizer vq)"
            in res.stderr.splitlines()), res.stderr
    assert "note: [generate] ignored (not used, not logged): --context-fraction (needs --context-image)" in res.stderr
    assert not (tmp_path / "mlruns").exists() and "pipeline" not in res.stdout


def test_a_conditional_option_must_say_what_it_needs():
    with pytest.raises(TypeError, match="needs"):
        opt(1, "An option.", applies=lambda c: True)
    with pytest.raises(TypeError, match="needs"):
        opt(1, "An option.", needs="--something")


def test_under_torchrun_only_the_first_process_says_it(tracking_dir, no_work, monkeypatch):
    args = ("train-vqvae", "--manifest", "images.csv", "--no-ema", "--ema-decay", "0.9")
    monkeypatch.setenv("RANK", "1")
    assert "ignored" not in invoke(*args).stderr
    monkeypatch.setenv("RANK", "0")
    assert "--ema-decay (needs" in invoke(*args).stderr
