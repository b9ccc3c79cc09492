"""The default run name and the printed resume command are words a shell and Hydra accept: pasted as is, it resumes."""
import json
import logging
import re
import shlex

import pytest
from omegaconf import OmegaConf

from rlkit.config import compose, default_config
from rlkit.trainer.run_dir import check_run_dir, continue_from_saved, resume_command, run_dir_of


def test_default_run_name_is_the_advantage_name_date_and_time():
    assert re.fullmatch(r"opo-\d{8}-\d{6}", compose(["+recipe=opo"]).logging.run_name)
    assert re.fullmatch(r"grpo-\d{8}-\d{6}", compose().logging.run_name)
    assert re.fullmatch(r"my_fn-\d{8}-\d{6}", compose(["algorithm.advantage=pkg.mod:my_fn"]).logging.run_name)


@pytest.mark.parametrize("name", [None, "it's a,b\\", "2026"], ids=["default", "odd", "number"])
def test_printed_resume_command_pasted_as_is_resumes(tmp_path, tiny_model_dir, name, caplog):
    cfg = compose([f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path / 'my runs'}", "+recipe=opo",
                   "trainer.save_every=4"])
    cfg.logging.run_name = name or str(cfg.logging.run_name)  # the trainer fixes ${now:...} once, at start
    run_dir = run_dir_of(cfg)
    (run_dir / "checkpoints" / "step_4").mkdir(parents=True)  # what 4 steps leave (state file only)
    (run_dir / "checkpoints" / "step_4" / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    program, *overrides = shlex.split(resume_command(cfg))[2:]  # as the shell hands it to python
    assert program == "rlkit.train"
    resumed = continue_from_saved(compose(overrides), default_config(), overrides)
    assert run_dir_of(resumed) == run_dir and resumed.trainer.resume == "auto"
    assert resumed.algorithm.advantage.name == "opo" and resumed.trainer.save_every == 4  # the saved config is the base
    with caplog.at_level(logging.INFO, logger="rlkit"):
        check_run_dir(resumed)
    assert f"run directory: {run_dir}" in caplog.text
