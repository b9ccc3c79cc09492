import json

import pytest

from rlkit.plot import plot_runs, read_metrics


def test_plot_overlays_runs(tmp_path):
    for name, slope in (("a", 0.1), ("b", 0.2)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "reward/mean": slope * s, "time/step": 2.0, "actor/entropy": 1.0} for s in range(1, 4)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "c.png", x="time")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert read_metrics(tmp_path / "a")[2]["reward/mean"] == pytest.approx(0.3)


def test_missing_run_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nope")
