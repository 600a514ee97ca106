"""Config: YAML + overrides, and malformed configs rejected with the field named."""

from __future__ import annotations

import pytest

from megatron_s2l.config import ConfigError, ParallelConfig, check_parallel_fits_model, load_config

VALID = """
steps: 16
model: {path: /models/qwen3-8b}
explorer: {mode: pool, pool_path: /pools/qwen3-1.7b}
schedule: {kind: linear, t_mix: 8}
optimizer: {lr: 1e-6}
"""


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_yaml_and_overrides(tmp_path):
    config = load_config(_write(tmp_path, VALID), ["rollout.group_size=8", "algorithm.dual_clip=null",
                                                     "optimizer.lr=2e-6", "logging.wandb=true"])
    assert config.steps == 16 and config.t_mix == 8
    assert config.rollout.group_size == 8
    assert config.algorithm.dual_clip is None
    assert config.optimizer.lr == 2e-6
    assert config.logging.wandb is True
    assert config.explorer.pool_path == "/pools/qwen3-1.7b"
    more = load_config(_write(tmp_path, VALID),
                       ["eval.extra={math500: /d/math500.jsonl, aime-25: /d/aime25.jsonl}"])
    assert more.eval.extra == {"math500": "/d/math500.jsonl", "aime-25": "/d/aime25.jsonl"}


def test_defaults_follow_the_paper():
    config = load_config(None, ["explorer.mode=off"])
    assert (config.rollout.group_size, config.optimizer.lr, config.optimizer.weight_decay) == (16, 1e-6, 0.01)
    assert (config.algorithm.eps_low, config.algorithm.dual_clip,
            config.algorithm.kl_coef) == (0.2, 3.0, 1e-3)
    assert config.algorithm.kl_type == "low_var_kl" and config.algorithm.reduction == "token_mean"
    assert config.t_mix == config.steps // 2  # T_mix defaults to half the steps


@pytest.mark.parametrize("text,overrides,field", [
    (VALID, ["rollout.grop_size=8"], "rollout.grop_size (did you mean rollout.group_size?)"),
    (VALID, ["bogus=1"], "bogus"),
    (VALID, ["rollout.group_size=eight"], "rollout.group_size='eight' must be an integer"),
    (VALID, ["rollout.group_size=0"], "rollout.group_size=0"),
    (VALID, ["steps=4"], "schedule.t_mix=8"),  # T_mix > steps
    (VALID, ["schedule.kind=exponential"], "schedule.kind='exponential' is not one of"),
    (VALID, ["algorithm.dual_clip=0.5"], "algorithm.dual_clip=0.5"),
    (VALID, ["optimizer.lr=-1"], "optimizer.lr=-1.0"),
    (VALID, ["explorer.pool_path="], "explorer.pool_path"),
    (VALID, ["explorer.mode=online"], "explorer.url"),
    (VALID, ["rollout.engine=sglang"], "rollout.learner_url"),
    (VALID, ["rollout.engine=sglang", "rollout.learner_url=http://x"], "rollout.weight_sync='memory'"),
    (VALID, ["logging.wandb=yes please"], "logging.wandb='yes please' must be true or false"),
    (VALID, ["optimizer.mini_batches_per_step=3", "rollout.prompts_per_step=16"],
     "optimizer.mini_batches_per_step=3"),
    (VALID, ["rollout.top_p=1.5"], "rollout.top_p=1.5"),
    (VALID, ["model.fp8.recipe=delayed", "model.dtype=float32"], "model.fp8="),
    (VALID, ["model.fp8.recipe=mxfp4"], "model.fp8.recipe='mxfp4' is not one of"),
    (VALID, ["parallel.tp=0"], "parallel.tp=0"),
    (VALID, ["parallel.driver_wait_minutes=0"], "parallel.driver_wait_minutes=0.0"),
    (VALID, ["rollout=3"], "rollout must be a mapping"),
    ("- just\n- a list\n", [], "top level must be a mapping"),
    (VALID, ["no_equals_sign"], "must look like key.sub=value"),
    (VALID, ["eval.extra=[/data/math500.jsonl]"], "eval.extra=['/data/math500.jsonl'] must be a mapping"),
    (VALID, ["eval.extra={math 500: /data/math500.jsonl}"], "eval.extra='math 500' is invalid"),
    (VALID, ["eval.extra={accuracy: /data/math500.jsonl}"], "eval.extra='accuracy' is invalid"),
    (VALID, ["eval.extra={math500: 3}"], "eval.extra.math500=3 must be a string"),
    (VALID, ["eval.samples_per_prompt=0"], "eval.samples_per_prompt=0 is invalid"),
])
def test_malformed_config_names_the_field(tmp_path, text, overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), overrides)
    assert field in str(err.value)


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "parallel.tp=3 does not divide the model's num_attention_heads=32"),
    (16, 1, "parallel.tp=16 does not divide the model's num_key_value_heads=8"),
    (1, 5, "parallel.pp=5 does not divide the model's num_hidden_layers=36"),
])
def test_parallel_layout_must_fit_the_model(tp, pp, message):
    with pytest.raises(ConfigError, match=message):  # Qwen3-8B: 32 heads, 8 KV heads, 36 layers
        check_parallel_fits_model(ParallelConfig(tp=tp, pp=pp), 32, 8, 36)
    check_parallel_fits_model(ParallelConfig(tp=8, pp=4), 32, 8, 36)


def test_every_example_config_loads():
    """The launch scripts and docs name these; an empty glob (moved folder) must not pass."""
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))
    assert {"grpo_qwen3_8b.yaml", "s2l_qwen3_8b.yaml", "s2l_qwen3_14b.yaml", "tiny_1gpu.yaml",
            "tiny_cpu.yaml"} <= {path.name for path in configs}
    for path in configs:
        load_config(path)


def test_print_config_shows_every_field_and_loads_back(tmp_path, capsys):
    """`s2l train --print-config`: the resolved config with defaults, which itself loads as a run config."""
    from megatron_s2l.cli import main
    from megatron_s2l.config import to_dict

    assert main(["train", "--config", str(_write(tmp_path, VALID)), "rollout.group_size=8",
                 "parallel.recompute=full", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    config = load_config(tmp_path / "printed.yaml")
    assert to_dict(config) == to_dict(load_config(_write(tmp_path, VALID), ["rollout.group_size=8",
                                                                             "parallel.recompute=full"]))
    assert config.rollout.group_size == 8 and config.parallel.recompute == "full"
    assert "  temperature: 1.0" in printed and "algorithm:" in printed  # defaults are spelled out
    assert main(["train", "--config", str(_write(tmp_path, VALID)), "rollout.gruop_size=8",
                 "--print-config"]) == 2


@pytest.mark.parametrize("steps,t_mix", [(1, 1), (2, 2), (3, 2), (4, 2), (16, 8)])
def test_the_default_t_mix_mixes_whenever_the_run_has_two_steps(steps, t_mix):
    assert load_config(None, [f"steps={steps}", "explorer.pool_path=pool"]).t_mix == t_mix


def test_an_explorer_run_that_cannot_mix_says_so(caplog):
    load_config(None, ["steps=4", "schedule.t_mix=1", "explorer.pool_path=pool"])
    assert "does not mix" in caplog.text
    caplog.clear()
    load_config(None, ["steps=4", "schedule.t_mix=1", "explorer.mode=off"])
    assert "does not mix" not in caplog.text
