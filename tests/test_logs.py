"""Issue 16, part 3: logs that stay readable.

Progress goes through ``adapters_mgr.progress``: a live tqdm bar on a terminal, a few whole lines
(never ``\\r`` frames) when the output is a file or a pipe. Known deprecation warnings of our
dependencies are silenced where we call them (``lora/quiet.py``); every other warning still shows.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from adapters_mgr import progress as progress_mod
from adapters_mgr.lora.quiet import known_warnings_silenced
from adapters_mgr.progress import LineProgress, progress_bar

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_mode_writes_a_line_per_interval_and_one_at_the_end():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(total=1000, desc="recompute", unit="user", stream=out, every=10.0, clock=clock)
    for _ in range(1000):  # 0.1 s a user: 100 s in all
        clock.now += 0.1
        bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()  # idempotent, as tqdm's
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 9 <= len(lines) <= 11, lines  # one per 10 s, plus the final one
    assert lines[0].startswith("recompute: 10") and "elapsed" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("recompute: 1000/1000 user in 1m40s") and lines[-1].endswith("loss=0.5")


def test_a_short_run_writes_exactly_one_line():
    out = io.StringIO()
    seen = list(LineProgress(iter(range(5)), total=5, desc="train", unit="step", stream=out, every=10.0))
    assert seen == [0, 1, 2, 3, 4]
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("train: 5/5 step in ")


@pytest.mark.parametrize(("stream", "forced", "expected"), [
    (Tty(), "", "tqdm"), (io.StringIO(), "", "LineProgress"), (Tty(), "lines", "LineProgress"),
    (io.StringIO(), "bar", "tqdm"), (Tty(), "off", "_Off"),
])
def test_the_mode_follows_the_stream_unless_forced(monkeypatch, stream, forced, expected):
    monkeypatch.setenv("ADAPTERS_MGR_PROGRESS", forced)
    from tqdm import tqdm

    bar = progress_bar(total=3, desc="x", stream=stream)
    try:
        assert ("tqdm" if isinstance(bar, tqdm) else type(bar).__name__) == expected
    finally:
        bar.close()


def test_disabled_reports_write_nothing_but_still_iterate(monkeypatch):
    monkeypatch.delenv("ADAPTERS_MGR_PROGRESS", raising=False)
    out = Tty()
    assert list(progress_bar(iter("abc"), total=3, enabled=False, stream=out)) == ["a", "b", "c"]
    assert out.getvalue() == ""
    assert progress_mod.mode(io.StringIO()) == "lines"


_TRAIN_TWICE = textwrap.dedent("""
    import tempfile
    import torch
    torch.set_num_threads(1)
    from adapters_mgr.lora.testing import synthetic_rows, tiny_base, tiny_tokenizer
    from adapters_mgr.lora.trainer import train_adapter
    tok = tiny_tokenizer(tempfile.mkdtemp())
    for run in range(2):
        result = train_adapter(tiny_base(), tok, "ranker", synthetic_rows(96), seed=run, epochs=3,
                               batch_size=4, max_length=16, lr=1e-3, progress=True)
        result.release()
    print("trained")
""")


def test_training_into_a_pipe_writes_lines_not_frames_and_no_dependency_warning():
    """Two trainings of 3 epochs x 24 steps, stdout and stderr into a pipe, every warning shown (-W always)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("ADAPTERS_MGR_PROGRESS", None)
    env.pop("ADAPTERS_MGR_PROGRESS_EVERY", None)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", _TRAIN_TWICE], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "\r" not in out
    assert "FutureWarning" not in out and "is_gradient_checkpointing" not in out, out
    epoch_lines = [ln for ln in out.splitlines() if ln.startswith("train ranker fresh epoch")]
    assert len(epoch_lines) >= 6  # each epoch says when it is done
    assert len(out.splitlines()) <= 6 * 3 + 2, out  # and a slow one at most a line per 10 s besides


def test_training_emits_no_known_dependency_warning(tmp_path):
    from adapters_mgr.lora.testing import synthetic_rows, tiny_base, tiny_tokenizer
    from adapters_mgr.lora.trainer import train_adapter

    tok = tiny_tokenizer(tmp_path / "tok")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_adapter(tiny_base(), tok, "ranker", synthetic_rows(16), seed=0, epochs=1,
                               batch_size=8, max_length=16, progress=False)
        result.release()
    futures = [str(w.message) for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]
    assert not [m for m in futures if "is_gradient_checkpointing" in m], futures


def test_silencing_is_targeted_and_scoped():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_warnings_silenced():
            warnings.warn("our own deprecation", FutureWarning, stacklevel=1)  # ours: still shown
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                                   "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                               "modeling_utils.py", 2, module="transformers.modeling_utils")  # outside: shown
    assert [str(w.message) for w in caught] == ["our own deprecation", "`is_gradient_checkpointing` is deprecated"]
