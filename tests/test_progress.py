"""Progress a person and a log file can read: bars count samples with a unit, rate and ETA; plain
lines when stderr is not a terminal; ``-v``/``-q``/``--log-file`` through stdlib logging."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import expect_error, invoke
from rich.console import Console
from typer.testing import CliRunner, Result

from kvwctl import console
from kvwctl.cli import app
from kvwctl.errors import KvwError, UsageError
from kvwctl.progress import RichTracker, progress_interval, progress_line
from kvwctl.testing import write_samples

LINE = re.compile(
    r"^(?P<description>[^:]+(?:: [^:]+)?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<percent>\d+)%\), "
    r"[\d.]+ (?P=unit)/s, elapsed \d+:\d\d:\d\d(?P<eta>, ETA \d+:\d\d:\d\d)?$"
)
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args], env=env)


def progress_lines(text: str, description: str) -> list[re.Match[str]]:
    """The plain progress lines of one loop, parsed (each must match the whole format)."""
    lines = [line for line in text.splitlines() if line.startswith(f"{description}: ")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [match for match in matches if match is not None]


# --- the plain line, by hand ---------------------------------------------------------------------


def test_progress_line_has_count_unit_percent_rate_elapsed_and_eta() -> None:
    # 96 in 31 s: 3.097 samples/s; 156 left at that rate take 50.4 s.
    assert (
        progress_line("profile retain", 96, 252, "samples", 31.0)
        == "profile retain: 96/252 samples (38%), 3.1 samples/s, elapsed 0:00:31, ETA 0:00:50"
    )
    # Done: no ETA; 100% only when every unit is done (999/1000 is 99%).
    assert progress_line("apply", 3, 3, "shards", 1.5) == "apply: 3/3 shards (100%), 2.0 shards/s, elapsed 0:00:01"
    assert progress_line("x", 999, 1000, "samples", 3725.0).startswith("x: 999/1000 samples (99%), 0.27 samples/s")
    assert progress_line("x", 999, 1000, "samples", 3725.0).endswith("elapsed 1:02:05, ETA 0:00:03")
    # Nothing done yet, or no time elapsed: no rate and no ETA rather than a guess.
    assert progress_line("x", 0, 10, "samples", 5.0) == "x: 0/10 samples (0%), elapsed 0:00:05"
    assert progress_line("x", 4, 10, "samples", 0.0) == "x: 4/10 samples (40%), elapsed 0:00:00"
    # Rates: whole numbers from 100, one decimal from 1, two significant digits below.
    assert ", 250 samples/s," in progress_line("x", 500, 1000, "samples", 2.0)
    assert ", 0.025 samples/s," in progress_line("x", 1, 1000, "samples", 40.0)


def tracker_records(
    caplog: pytest.LogCaptureFixture, times: list[float], items: list[list[int]], interval: float
) -> list[str]:
    """The progress records of one loop of ``items`` (units: their lengths) on a fake clock."""
    clock = iter(times)
    tracker = RichTracker(show_bars=False, interval=interval, clock=lambda: next(clock))
    with caplog.at_level(logging.DEBUG, logger="kvwctl"):
        seen = list(tracker.track(items, total=sum(map(len, items)), description="d", unit="samples", size=len))
    assert seen == items
    assert next(clock, None) is None, "the clock was read a different number of times"
    return [record.getMessage() for record in caplog.records if record.name == "kvwctl.progress"]


def test_plain_lines_at_most_every_interval_and_one_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    # Start at 0; items of 4, 4 and 2 samples end at 4 s, 12 s and 15 s; a line is due 10 s after the last.
    lines = tracker_records(caplog, [0, 4, 12, 15, 15], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]], interval=10)
    assert lines == [
        "d: 8/10 samples (80%), 0.67 samples/s, elapsed 0:00:12, ETA 0:00:03",  # 2 left at 8/12 per second
        "d: 10/10 samples (100%), 0.67 samples/s, elapsed 0:00:15",
    ]


def test_interval_zero_gives_a_line_per_item_and_no_repeated_last_line(caplog: pytest.LogCaptureFixture) -> None:
    lines = tracker_records(caplog, [0, 1, 4], [[1], [2, 3]], interval=0)
    assert lines == [
        "d: 1/3 samples (33%), 1.0 samples/s, elapsed 0:00:01, ETA 0:00:02",
        "d: 3/3 samples (100%), 0.75 samples/s, elapsed 0:00:04",
    ]


def test_a_loop_left_early_writes_no_end_line(caplog: pytest.LogCaptureFixture) -> None:
    tracker = RichTracker(show_bars=False, interval=100, clock=iter([0.0, 1.0]).__next__)
    with caplog.at_level(logging.INFO, logger="kvwctl"):
        for item in tracker.track([1, 2, 3], total=3, description="d"):
            if item == 2:
                break
    assert not [record for record in caplog.records if record.name == "kvwctl.progress"]


def test_status_says_what_loads_and_how_long_it_took(caplog: pytest.LogCaptureFixture) -> None:
    tracker = RichTracker(show_bars=False, interval=10, clock=iter([3.0, 5.5]).__next__)
    with caplog.at_level(logging.DEBUG, logger="kvwctl"), tracker.status("Loading tiny/model"):
        pass
    assert [(record.name, record.levelname, record.getMessage()) for record in caplog.records] == [
        ("kvwctl.progress", "INFO", "Loading tiny/model"),
        ("kvwctl", "DEBUG", "Loading tiny/model: done in 2.50 s"),
    ]


def test_progress_interval_comes_from_the_environment_and_is_checked() -> None:
    assert progress_interval({}) == 10.0
    assert progress_interval({"KVW_PROGRESS_INTERVAL": "0"}) == 0.0
    assert progress_interval({"KVW_PROGRESS_INTERVAL": "2.5"}) == 2.5
    for text in ("abc", "-1", "inf", "nan", ""):
        with pytest.raises(UsageError) as raised:
            progress_interval({"KVW_PROGRESS_INTERVAL": text})
        assert raised.value.message == f"KVW_PROGRESS_INTERVAL must be a number of seconds, at least 0, got {text!r}"


# --- what a command writes when stderr is not a terminal -----------------------------------------


@pytest.fixture(scope="module")
def text_retain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 text-only samples (56 profiled positions on the tiny qwen2)."""
    return write_samples(tmp_path_factory.mktemp("progress") / "retain.jsonl", count=8, with_images=False)


def profile_args(checkpoints: dict[str, Path], data: Path, out: Path) -> list[str | Path]:
    # 8 retain samples in batches of 3: 3, 6, 8.
    return [
        "profile", "--model", checkpoints["qwen2"], "--data", data, "--split", "retain",
        "--batch-size", "3", "--out", out,
    ]  # fmt: skip


def test_profile_not_on_a_terminal_writes_plain_lines_counting_samples(
    checkpoints: dict[str, Path], text_retain: Path, tmp_path: Path
) -> None:
    result = run(
        *profile_args(checkpoints, text_retain, tmp_path / "r.safetensors"), env={"KVW_PROGRESS_INTERVAL": "0"}
    )
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "profile retain")
    assert [(int(line["done"]), int(line["total"]), line["unit"]) for line in lines] == [
        (3, 8, "samples"),
        (6, 8, "samples"),
        (8, 8, "samples"),
    ]
    assert [int(line["percent"]) for line in lines] == [37, 75, 100]
    assert [line["eta"] is not None for line in lines] == [True, True, False]
    assert result.stderr.splitlines().count(f"Loading {checkpoints['qwen2']}") == 1
    # Nothing terminal-only: no bar, no cursor movement or colour, no carriage return.
    assert "━" not in result.stderr and "\x1b" not in result.stderr and "\r" not in result.stderr
    assert result.stdout == f"{tmp_path / 'r.safetensors'}\n"


def test_the_default_interval_writes_only_the_end_line_of_a_short_loop(
    checkpoints: dict[str, Path], text_retain: Path, tmp_path: Path
) -> None:
    result = run(
        *profile_args(checkpoints, text_retain, tmp_path / "r.safetensors"), env={"KVW_PROGRESS_INTERVAL": "600"}
    )
    assert result.exit_code == 0, result.output
    assert [line.group(0).split(",")[0] for line in progress_lines(result.stderr, "profile retain")] == [
        "profile retain: 8/8 samples (100%)"
    ]


def test_quiet_shows_no_progress_and_a_bad_interval_is_a_usage_error(
    checkpoints: dict[str, Path], text_retain: Path, tmp_path: Path
) -> None:
    args = profile_args(checkpoints, text_retain, tmp_path / "r.safetensors")
    quiet = run(*args, "--quiet", env={"KVW_PROGRESS_INTERVAL": "0"})
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    bad = run(*args, env={"KVW_PROGRESS_INTERVAL": "soon"})
    expect_error(bad, "KVW_PROGRESS_INTERVAL must be a number of seconds, at least 0, got 'soon'", exit_code=2)


def test_eval_names_the_model_of_how_many_and_counts_samples_and_answers(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # 2 samples with 3 options each (the answer among them): 2 generations, 6 scored answers per model.
    samples = tmp_path / "mc.jsonl"
    records = [
        {"id": "a", "question": "Where was Mira born?", "answer": "Lagos", "options": ["Lagos", "Paris", "Lima"]},
        {"id": "b", "question": "Where was Tomas born?", "answer": "Paris", "options": ["Oslo", "Paris", "Rome"]},
    ]
    samples.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = run(
        "eval", "--model", checkpoints["qwen2"], "--baseline", checkpoints["llama"], "--data", f"mc={samples}",
        "--max-new-tokens", "2", "--batch-size", "4", "--out", tmp_path / "eval.json",
        env={"KVW_PROGRESS_INTERVAL": "0"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for index, role in ((1, "model"), (2, "baseline")):
        label = f"model {index}/2 ({role})"
        generate = progress_lines(result.stderr, f"{label}: mc generate")
        score = progress_lines(result.stderr, f"{label}: mc score")
        assert [(line["done"], line["total"], line["unit"]) for line in generate] == [("2", "2", "samples")]
        assert [(line["done"], line["total"], line["unit"]) for line in score] == [
            ("4", "6", "answers"),
            ("6", "6", "answers"),
        ]
        reference = checkpoints["qwen2"] if role == "model" else checkpoints["llama"]
        assert f"{label}: loading {reference}" in result.stderr.splitlines()


def test_apply_counts_shards(checkpoints: dict[str, Path], accessor: Path, tmp_path: Path) -> None:
    out = tmp_path / "unlearned"
    result = run(
        "apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--gamma", "0.02", "--layers", "1:2",
        "--out", out, env={"KVW_PROGRESS_INTERVAL": "0"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shards = len(list(out.glob("*.safetensors")))
    assert shards > 1
    lines = progress_lines(result.stderr, "apply")
    assert [(int(line["done"]), int(line["total"]), line["unit"]) for line in lines] == [
        (done, shards, "shards") for done in range(1, shards + 1)
    ]


# --- a real process with stderr in a file, and the log file --------------------------------------


def test_a_process_with_stderr_in_a_file_and_a_log_file(
    checkpoints: dict[str, Path], text_retain: Path, tmp_path: Path
) -> None:
    log, stderr_path = tmp_path / "kvw.log", tmp_path / "stderr.txt"
    log.write_text("an earlier line\n")  # appended to, never replaced
    environment = {**os.environ, "KVW_PROGRESS_INTERVAL": "0", "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [str(arg) for arg in profile_args(checkpoints, text_retain, tmp_path / "r.safetensors")]
    with stderr_path.open("w") as stderr:
        completed = subprocess.run(
            [sys.executable, "-m", "kvwctl", *args, "-v", "--log-file", str(log)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment, timeout=300,
        )  # fmt: skip
    written = stderr_path.read_text()
    assert completed.returncode == 0, written
    assert len(progress_lines(written, "profile retain")) == 3
    assert "\x1b" not in written and "━" not in written
    assert re.search(
        r"^kvwctl profile: split=retain, model=\S+, data=\S+, out=\S+, batch_size=3, verbose=True, log_file=\S+$",
        written,
        re.MULTILINE,
    )
    assert re.search(rf"^Loading {re.escape(str(checkpoints['qwen2']))}: done in \d+\.\d\d s$", written, re.MULTILINE)
    assert re.search(r"^finished in \d+\.\d\d s$", written, re.MULTILINE)

    text = log.read_text()
    assert text.startswith("an earlier line\n")
    entries = text.splitlines()[1:]
    assert TIMESTAMPED.match(entries[0]), entries
    stamped = [line for line in entries if TIMESTAMPED.match(line)]
    messages = [TIMESTAMPED.sub("", line) for line in stamped]
    assert [LINE.match(message) is not None for message in messages if message.startswith("profile retain:")] == [
        True
    ] * 3
    assert f"Profiled 8 samples, 56 positions, 4 layers -> {tmp_path / 'r.safetensors'}" in messages
    assert any(" DEBUG kvwctl: kvwctl profile: split=retain" in line for line in stamped)
    assert any(" INFO kvwctl.progress: profile retain: 8/8 samples (100%)" in line for line in stamped)
    assert "  batch_size  3" in entries and "\x1b" not in text and "━" not in text


def test_on_a_terminal_bars_show_and_the_log_file_gets_plain_lines_only(
    checkpoints: dict[str, Path], text_retain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Console(stderr=True, force_terminal=True, width=160, highlight=False)
    monkeypatch.setattr(console, "_console", terminal)
    log = tmp_path / "kvw.log"
    args = profile_args(checkpoints, text_retain, tmp_path / "r.safetensors")
    result = run(*args, "--log-file", log, env={"KVW_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0, result.output
    # The bar: description, bar, M/N, unit, rate, elapsed, ETA; the plain lines stay off the terminal.
    bars = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stderr)  # without colours and cursor movements
    assert re.search(
        r"profile retain [━╸╺]+ \d/8 samples (\?|[\d.]+) samples/s \d:\d\d:\d\d ETA (-:--:--|\d:\d\d:\d\d)", bars
    )
    assert not progress_lines(result.stderr, "profile retain")
    assert "Profiled 8 samples" in result.stderr
    text = log.read_text()
    assert (
        len(progress_lines("\n".join(TIMESTAMPED.sub("", line) for line in text.splitlines()), "profile retain")) == 3
    )
    assert "━" not in text and "\x1b" not in text and "\r" not in text


@pytest.fixture
def stage_that_warns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """``profile``'s stage replaced by one that warns (Python and transformers) and fails at once."""

    def run_profile(*args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # shown every time, not once per place
            warnings.warn("a python warning", UserWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        logging.getLogger("huggingface_hub.file_download").warning("a hub warning")
        for name in ("transformers", "huggingface_hub", "py.warnings"):  # only kvwctl's handlers, none of theirs
            handlers_during[name] = sorted(type(handler).__name__ for handler in logging.getLogger(name).handlers)
        raise KvwError("the stage stopped here", hint="a hint for the log")

    handlers_during: dict[str, list[str]] = {}
    monkeypatch.setattr("kvwctl.profile.plan_profile", lambda *args, **kwargs: None)  # the CLI plans first
    monkeypatch.setattr("kvwctl.profile.execute_profile", run_profile)
    before = {name: list(logging.getLogger(name).handlers) for name in ("kvwctl", "transformers", "py.warnings")}
    yield handlers_during
    # The command's handlers are gone afterwards, the libraries' own are back.
    assert {name: list(logging.getLogger(name).handlers) for name in before} == before
    assert warnings.showwarning.__module__ != "logging"


ARGS = ("profile", "--model", "m", "--data", "d.jsonl", "--split", "retain", "--out", "o.safetensors")


def test_library_warnings_go_to_the_log_file_and_transformers_to_stderr_only_with_verbose(
    stage_that_warns: dict[str, list[str]], tmp_path: Path
) -> None:
    log = tmp_path / "kvw.log"
    result = invoke(*ARGS, "--log-file", log)
    expect_error(result, "the stage stopped here")
    assert stage_that_warns == {
        "transformers": ["FileHandler"],
        "huggingface_hub": ["FileHandler"],
        "py.warnings": ["FileHandler", "StderrHandler"],
    }
    assert "a python warning" in result.stderr and "a transformers warning" not in result.stderr
    assert "a hub warning" not in result.stderr
    assert "Traceback" not in result.stderr
    text = log.read_text()
    assert re.search(r" WARNING py\.warnings: .*UserWarning: a python warning", text)
    assert " WARNING transformers.modeling_utils: a transformers warning\n" in text
    assert " WARNING huggingface_hub.file_download: a hub warning\n" in text
    assert " ERROR kvwctl: Error: the stage stopped here\nHint: a hint for the log\n" in text
    assert "Traceback (most recent call last)" in text and "KvwError: the stage stopped here" in text

    verbose = invoke(*ARGS, "-v")
    assert "[transformers.modeling_utils] a transformers warning" in verbose.stderr.splitlines()
    quiet = invoke(*ARGS, "-q", "--log-file", log)
    assert quiet.stderr.splitlines() == ["Error: the stage stopped here", "Hint: a hint for the log"]
    assert log.read_text().count("ERROR kvwctl: Error: the stage stopped here") == 2  # appended


def test_a_log_file_that_cannot_be_opened_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "kvw.log"
    expect_error(
        invoke(*ARGS, "--log-file", missing),
        f"--log-file {missing} is in {missing.parent}, which is not a directory",
    )
    expect_error(invoke(*ARGS, "--log-file", tmp_path), f"--log-file {tmp_path} is a directory")


def test_verbose_and_the_log_file_never_show_a_token(tmp_path: Path) -> None:
    log = tmp_path / "kvw.log"
    result = invoke("push", tmp_path / "missing", "owner/name", "--token", "hf_s3cret", "-v", "--log-file", log)
    assert result.exit_code == 1, result.output
    assert "kvwctl push: " in result.stderr and "token=<hidden>" in result.stderr
    assert "token=<hidden>" in log.read_text()
    assert "hf_s3cret" not in result.stderr and "hf_s3cret" not in log.read_text()
