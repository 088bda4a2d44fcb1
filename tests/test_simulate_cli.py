"""`fedge simulate` refuses before it touches anything: a report folder it did not write (fedge.report.
claim_report_folder never deletes a user's files), a missing scenario, numbers that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.cli import main
from fedge.job.load import bundled_job_path as fedge_job_path
from fedge.report import REPORT_MARKER, ReportFolderError, claim_report_folder


def test_a_new_or_empty_folder_is_claimed_and_marked(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new" / "nested", tmp_path / "empty"):
        assert claim_report_folder(folder) == folder
        assert [entry.name for entry in folder.iterdir()] == [REPORT_MARKER]


def test_an_earlier_report_is_replaced(tmp_path: Path) -> None:
    out = claim_report_folder(tmp_path / "report")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "state.npz").write_bytes(b"state")
    claim_report_folder(out)
    assert [entry.name for entry in out.iterdir()] == [REPORT_MARKER]


@pytest.mark.parametrize("marked", [False, True])
def test_a_folder_with_other_files_is_refused_and_left_as_is(tmp_path: Path, marked: bool) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    if marked:  # a report folder the user has since put their own files in
        (tmp_path / REPORT_MARKER).write_text("")
    before = sorted(entry.name for entry in tmp_path.iterdir())
    with pytest.raises(ReportFolderError, match="thesis.tex" if marked else "fedge did not write"):
        claim_report_folder(tmp_path)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == before
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "report").write_text("mine")
    with pytest.raises(ReportFolderError, match="not a folder"):
        claim_report_folder(tmp_path / "report")
    assert (tmp_path / "report").read_text() == "mine"


def test_fedge_simulate_refuses_before_touching_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--out", "."]) == 2
    assert f"fedge simulate: error: {tmp_path} holds files fedge did not write (notes.txt)" in capsys.readouterr().err
    assert main(["simulate", "missing.toml", "--out", "."]) == 2
    assert "job missing.toml: cannot read it" in capsys.readouterr().err
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("option, value, message", [
    ("--rounds", "0", "rounds.count must be an integer >= 1, got 0"),
    ("--rounds", "-3", "rounds.count must be an integer >= 1, got -3"),
    ("--deadline", "0", "rounds.deadline must be a number > 0, got 0.0"),
    ("--deadline", "inf", "rounds.deadline must be a number > 0, got inf"),
    ("--set", "rounds.count=-1", "rounds.count must be an integer >= 1, got -1"),
    ("--set", "process.aggregator.name=mode", "process.aggregator.name must be one of mean, median, trimmed_mean"),
])
def test_fedge_simulate_refuses_numbers_that_cannot_work(option: str, value: str, message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # were it not refused, its report would land here
    assert main(["simulate", option, value]) == 2
    error = capsys.readouterr().err
    assert f"fedge simulate: error: {fedge_job_path()}: {message}" in error and "Traceback" not in error
    assert not any(tmp_path.iterdir())


def test_fedge_simulate_refuses_what_is_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--clients-per-round", "x"])
    assert exit_info.value.code == 2
    assert "argument --clients-per-round: invalid int value: 'x'" in capsys.readouterr().err
