"""Every numeric option of every command, taken out of its declared range, is a one-line error before any work:
the cases are generated from the config dataclasses, so a new option cannot be forgotten."""
from __future__ import annotations

import dataclasses

import pytest

from cli import cli
from conftest import invoke
from core.errors import UserError
from core.options import range_text


def _out_of_range(f: dataclasses.Field, item: type) -> object:
    m = f.metadata
    if "ge" in m:
        return item(m["ge"]) - (1 if item is int else 0.5)
    if "gt" in m:
        return item(m["gt"])
    if "le" in m:
        return item(m["le"]) + (1 if item is int else 0.5)
    return item(m["lt"])


def _cases() -> list:
    cases = []
    for name, command in sorted(cli.commands.items()):
        cls = getattr(command.callback, "config_class", None)
        if cls is None:
            continue
        for f in dataclasses.fields(cls):
            if range_text(f):
                default = f.default if f.default is not None else 1
                item = type(default[0]) if isinstance(default, tuple) and default else (
                    int if isinstance(default, tuple) else type(default))
                cases.append(pytest.param(name, cls, f, _out_of_range(f, item), id=f"{name}--{f.name}"))
    return cases


CASES = _cases()


def test_every_stage_command_has_ranged_options():
    assert {c.values[0] for c in CASES} >= {"train-vqvae", "quantize", "train", "generate", "decode", "evaluate"}


@pytest.mark.parametrize("command,cls,field,value", CASES)
def test_out_of_range_option_is_one_line_error(tracking_dir, command, cls, field, value):
    option = "--" + field.name.replace("_", "-")
    res = invoke(command, option, value)
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert res.output.count("\n") == 1 and res.output.startswith(f"Error: {option} must be "), res.output
    assert "Traceback" not in res.output
    with pytest.raises(UserError, match=f"{option} must be"):  # Python callers get the same check
        cls(**{field.name: (value,) if isinstance(field.default, tuple) else value})


@pytest.mark.parametrize("args,message", [
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--ema-decay", "1.5"], "--ema-decay must be >= 0, < 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--codebook-size", "0"], "--codebook-size must be >= 2"),
    (["--quantizer", "fsq", "--codebook-init", "kmeans", "--warmup-steps", "5"], "--codebook-init applies to"),
    (["--codebook-init", "kmeans"], "pass --warmup-steps"),
    (["--ch-mult", "1,0"], "--ch-mult must be >= 1"),
])
def test_issue_cases_fail_before_any_work(tracking_dir, dataset, args, message):
    import mlflow

    before = len(mlflow.search_runs(search_all_experiments=True))
    res = invoke("train-vqvae", "--manifest", dataset, "--perceptual-weight", "0", *args)
    assert res.exit_code == 1 and message in res.output, res.output
    assert len(mlflow.search_runs(search_all_experiments=True)) == before  # no run was even started


def test_pipeline_config_file_gets_the_same_error(tmp_path, tracking_dir, dataset):
    config = tmp_path / "p.toml"
    config.write_text("[train]\ngrad-accum = 0\n")
    res = invoke("pipeline", "--manifest", dataset, "--config", config)
    assert res.exit_code == 1 and "--grad-accum must be >= 1" in res.output, res.output


def test_resumed_runs_keep_the_behaviour_of_options_they_predate():
    from core.options import config_from_dict
    from transformer.config import GPTTrainConfig

    saved = {k: v for k, v in dataclasses.asdict(GPTTrainConfig(quantize_run_id="x")).items() if k != "pos_emb"}
    assert config_from_dict(GPTTrainConfig, saved).pos_emb == "none"  # trained before positions existed
    assert config_from_dict(GPTTrainConfig, {**saved, "pos_emb": "rowcol"}).pos_emb == "rowcol"
    assert GPTTrainConfig().pos_emb == "rowcol"
    from vqvae.config import VQConfig

    saved = {k: v for k, v in dataclasses.asdict(VQConfig(manifest="x")).items() if k != "adam_betas"}
    assert config_from_dict(VQConfig, saved).adam_betas == (0.5, 0.9)  # the official betas, used before the option
    saved = {k: v for k, v in dataclasses.asdict(VQConfig(manifest="x")).items() if k != "lr_schedule"}
    assert config_from_dict(VQConfig, saved).end_lr is None  # a constant rate, as those runs trained
    assert VQConfig(lr_schedule="cosine").end_lr == 0.0 and VQConfig(lr_schedule="cosine", min_lr=1e-5).end_lr == 1e-5


def test_learning_rate_schedule_warms_up_decays_and_stays_constant_without_min_lr():
    from core.loop import cosine_lr

    lrs = [cosine_lr(s, 1e-3, 1e-4, 10, 110) for s in range(120)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5.5e-4)  # half way: the mean of the two
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[110:] == pytest.approx([1e-4] * 10)
    assert [cosine_lr(s, 1e-3, None, 10, 110) for s in (9, 10, 60, 200)] == [1e-3] * 4
    assert cosine_lr(0, 1e-3, 0.0, 0, 5) == 1e-3  # no warm-up: the peak at once


def test_min_lr_above_lr_or_without_the_decay_is_a_one_line_error(tracking_dir, dataset):
    res = invoke("train-vqvae", "--manifest", dataset, "--lr-schedule", "cosine", "--lr", "1e-4", "--min-lr", "1e-3")
    assert res.exit_code == 1 and "--min-lr 0.001 is above --lr 0.0001" in res.output, res.output
    assert "Traceback" not in res.output
    res = invoke("train-vqvae", "--manifest", dataset, "--min-lr", "1e-5")  # the default schedule is constant
    assert res.exit_code == 1 and "--min-lr 1e-05 applies to --lr-schedule cosine only" in res.output, res.output
    # the transformer always decays: only the order of the two rates is checked, before its quantize run is read
    res = invoke("train", "--quantize-run-id", "0" * 32, "--lr", "1e-4", "--min-lr", "1e-3")
    assert res.exit_code == 1 and "--min-lr 0.001 is above --lr 0.0001" in res.output, res.output


def test_adam_betas_need_two_values_in_range(tracking_dir, dataset):
    for value, message in (("0.9", "--adam-betas takes two numbers"), ("0.9,1.5", "--adam-betas must be >= 0, < 1")):
        res = invoke("train-vqvae", "--manifest", dataset, "--adam-betas", value)
        assert res.exit_code == 1 and message in res.output, res.output


def test_train_option_pairs_are_one_line_errors(tracking_dir):
    res = invoke("train", "--quantize-run-id", "0" * 32, "--no-rel-bias", "--pos-emb", "none")
    assert res.exit_code == 1 and "--no-rel-bias needs --pos-emb rowcol" in res.output, res.output
    assert "Traceback" not in res.output
