"""`python -m rlkit.plot`: curves of good runs, one clear line for bad metrics files, smoothing."""
import json
import subprocess
import sys

import pytest

from rlkit.plot import MetricsError, choose_panels, figure, main, moving_average, plot_runs, read_metrics


def _write_run(run, rows, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def _rows(slope, steps=4, **extra):
    return [{"step": s, "reward/mean": slope * s, "reward/accuracy": slope * s, "time/step": 2.0,
             "actor/entropy": 1.0, "response/length_mean": 40.0 - s, "response/length_std": 5.0,
             "rollout/logprob_gap_mean": 1e-5, **extra} for s in range(1, steps + 1)]


def _plot_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlkit.plot", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _plot_main(monkeypatch, capsys, *args):
    """`python -m rlkit.plot ARGS` in-process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rlkit.plot", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_plot_overlays_runs(tmp_path):
    a = _write_run(tmp_path / "a", _rows(0.1))
    b = _write_run(tmp_path / "b", _rows(0.2))
    out = plot_runs([a, b], tmp_path / "c.png", x="time", smooth=3)
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert read_metrics(a)[2]["reward/mean"] == pytest.approx(0.3)


def test_binary_reward_shows_one_reward_panel_and_the_useful_ones():
    keys = [p.key for p in choose_panels([_rows(0.1)])]
    assert keys == ["reward/mean", "response/length_mean", "actor/entropy", "rollout/logprob_gap_mean", "time/step"]
    graded = [dict(r, **{"reward/mean": 0.5}) for r in _rows(0.1)]  # partial credit: reward != accuracy
    assert [p.key for p in choose_panels([graded])][:2] == ["reward/mean", "reward/accuracy"]


def test_eval_benchmarks_get_their_own_panels():
    rows = _rows(0.1) + [{"step": 4, "eval/math500/pass@1": 0.2, "eval/gsm8k/pass@1": 0.3}]
    panels = choose_panels([rows])
    assert [p.key for p in panels][-2:] == ["eval/gsm8k/pass@1", "eval/math500/pass@1"]
    assert not panels[-1].smooth


def test_moving_average_is_trailing_and_keeps_length():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert moving_average([3.0, 6.0], 5) == [3.0, 4.5]


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    run = _write_run(tmp_path / "crashed", _rows(0.1, steps=3), tail='{"step": 4, "reward/me')
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert "line 4 is truncated" in caplog.text
    result = _plot_cli(run, "--out", tmp_path / "x.png")
    assert result.returncode == 0 and (tmp_path / "x.png").is_file()
    assert "line 4 is truncated" in result.stderr and "Traceback" not in result.stderr


def test_a_broken_line_in_the_middle_is_named(tmp_path):
    run = _write_run(tmp_path / "r", _rows(0.1, steps=1), tail="not json\n" + json.dumps(_rows(0.1)[1]) + "\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl: line 2 is not JSON .* Fix: "):
        read_metrics(run)


@pytest.mark.parametrize("content, problem", [
    ("", "holds no complete metrics line"),
    ('{"step": 1, "rew', "holds no complete metrics line"),
    ("[1, 2]\n", "line 1 is not a metrics row"),
])
def test_bad_files_fail_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys, content, problem):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    code, err = _plot_main(monkeypatch, capsys, run)
    assert code == 2 and err.endswith("\n") and err.count("\n") == 1
    assert err.startswith(f"rlkit.plot: {run / 'metrics.jsonl'}: {problem}") and "Fix: " in err


def test_missing_run_names_the_path(tmp_path, monkeypatch, capsys):
    code, err = _plot_main(monkeypatch, capsys, tmp_path / "nope")
    assert code == 2 and err == (f"rlkit.plot: {tmp_path / 'nope' / 'metrics.jsonl'}: not found. "
                                 "Fix: pass a run directory (runs/<name>) that holds metrics.jsonl\n")


def test_smooth_must_be_a_positive_window(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "a", _rows(0.1))
    code, err = _plot_main(monkeypatch, capsys, run, "--smooth", "0")
    assert code == 2 and "--smooth" in err


def _panels(fig) -> dict:
    return {ax.get_ylabel(): ax for ax in fig.axes if ax.get_visible()}


def test_step_axes_get_integer_ticks(tmp_path):
    import matplotlib.pyplot as plt

    fig = figure([_write_run(tmp_path / "a", _rows(0.1, steps=3))])
    for title, ax in _panels(fig).items():
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (title, ticks)
    plt.close(fig)


def test_a_panel_constant_by_construction_says_so_instead_of_a_flat_line(tmp_path):
    import matplotlib.pyplot as plt

    on_policy = _rows(0.1, **{"actor/clip_frac": 0.0})
    fig = figure([_write_run(tmp_path / "a", on_policy), _write_run(tmp_path / "b", on_policy)])
    clip, reward = _panels(fig)["clip fraction"], _panels(fig)["reward (= accuracy)"]
    assert not clip.lines and len(reward.lines) == 2
    [text] = [t.get_text() for t in clip.texts]
    assert text.startswith("0 at every logged step") and "on-policy" in text
    plt.close(fig)
    moving = [dict(r, **{"actor/clip_frac": 0.01 * r["step"]}) for r in on_policy]
    fig = figure([_write_run(tmp_path / "c", moving)])
    assert _panels(fig)["clip fraction"].lines and not _panels(fig)["clip fraction"].texts
    plt.close(fig)
