"""route_library_logs: vLLM's per-step chatter goes to <run>/train.log, rlkit's progress and vLLM's errors to the console."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from rlkit.logs import LIBRARY_LOGGERS, LOG_FILE, RLKIT_LOGGER, route_library_logs

# The two records vLLM 0.32 logs on every weight push (layerwise reload, then our prefix-cache reset).
PER_STEP = ("RotaryEmbedding: Failed to load weights", "Successfully reset prefix cache")


@pytest.fixture(autouse=True)
def restore_loggers():
    """Put back the handlers, level and propagation of every logger the routing touches."""
    names = (RLKIT_LOGGER, *LIBRARY_LOGGERS)
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in names}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def emit_step_records():
    vllm = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    vllm.warning(PER_STEP[0])
    logging.getLogger("vllm.v1.core.block_pool").info(PER_STEP[1])
    logging.getLogger("vllm.v1.engine.core").error("EngineCore failed: out of KV cache blocks")
    logging.getLogger("transformers.generation.utils").warning("Setting `pad_token_id` to `eos_token_id`")
    logging.getLogger("rlkit").info("step 1  reward/mean=0.5")


def test_library_records_go_to_the_file_and_only_errors_to_the_console(tmp_path, capsys):
    console = logging.StreamHandler(sys.stdout)  # what an entry point (Hydra) puts on the root logger
    logging.getLogger().addHandler(console)
    try:
        route_library_logs(tmp_path)
        emit_step_records()
    finally:
        logging.getLogger().removeHandler(console)
    out, err = capsys.readouterr()
    log = (tmp_path / LOG_FILE).read_text()
    for message in (*PER_STEP, "out of KV cache blocks", "pad_token_id", "step 1  reward/mean=0.5"):
        assert message in log
    assert "WARNING vllm.model_executor.model_loader.reload.layerwise: RotaryEmbedding" in log
    assert out == "step 1  reward/mean=0.5\n"  # rlkit's own line still reaches the console
    assert "EngineCore failed: out of KV cache blocks" in err  # a genuine vLLM error is not hidden
    for message in (*PER_STEP, "pad_token_id"):
        assert message not in out + err


def test_a_library_handler_installed_before_is_replaced(tmp_path, capsys):
    """vLLM's own stdout handler (what it installs when it configures logging) must not keep printing."""
    logging.getLogger("vllm").addHandler(logging.StreamHandler(sys.stdout))
    route_library_logs(tmp_path)
    emit_step_records()
    out, _ = capsys.readouterr()
    assert not any(message in out for message in PER_STEP)
    assert all(message in (tmp_path / LOG_FILE).read_text() for message in PER_STEP)


def test_second_call_moves_the_routing_instead_of_duplicating_it(tmp_path, capsys):
    first, second = tmp_path / "run1", tmp_path / "run2"
    route_library_logs(first)
    route_library_logs(second)
    route_library_logs(second)
    for name in (RLKIT_LOGGER, *LIBRARY_LOGGERS):
        files = [h for h in logging.getLogger(name).handlers if isinstance(h, logging.FileHandler)]
        assert [Path(h.baseFilename) for h in files] == [second / LOG_FILE]
    emit_step_records()
    _, err = capsys.readouterr()
    assert err.count("out of KV cache blocks") == 1
    assert (first / LOG_FILE).read_text() == ""
    assert (second / LOG_FILE).read_text().count(PER_STEP[1]) == 1


@pytest.mark.slow
def test_training_console_shows_no_vllm_chatter(tmp_path, tiny_model_dir):
    """A real run of the tiny model: the per-step vLLM records are in train.log, not on stdout/stderr."""
    from test_trainer_e2e import TINY

    overrides = [f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path}", "logging.run_name=quiet",
                 *[o for o in TINY if not o.startswith("logging.progress_bar")], "trainer.total_steps=2"]
    done = subprocess.run([sys.executable, "-m", "rlkit.train", *overrides], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    for message in PER_STEP:
        assert message not in done.stdout + done.stderr
    assert done.stdout.count("step ") == 2  # rlkit's step lines stay on the console
    log = (tmp_path / "quiet" / LOG_FILE).read_text()
    assert all(log.count(message) >= 2 for message in PER_STEP)  # one per weight push, routed, not lost
