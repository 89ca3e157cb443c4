"""The run directory is never clobbered: the cases ``tests/test_cli.py`` does not cover.

(``tests/test_cli.py`` covers refusing a non-empty run directory and replacing it with ``overwrite=true``.)
Each refusal is one stderr line, comes before any work (no dataset generated, nothing written) and
leaves the directory byte-identical.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from oddetr.cli import main


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys, stderr_lines) -> str:
    capsys.readouterr()
    assert main(argv) != 0
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("oddetr train: error:"), lines
    return lines[0]


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "my_documents"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "notes" / "todo.txt").write_text("back up the thesis")
    (folder / "last.pt").write_bytes(b"not mine to overwrite")
    return folder


def test_overwrite_deletes_run_directories_only(tmp_path: Path, tiny_keys, capsys, stderr_lines) -> None:
    folder = _user_folder(tmp_path)
    before = _hashes(folder)
    synthetic = tmp_path / "synthetic"
    keys = tiny_keys(f"data.synthetic.root={synthetic}", f"output={folder}")
    for extra in ([], ["overwrite=true"]):
        line = _refused(["train", *keys, *extra], capsys, stderr_lines)
        assert str(folder) in line
        assert _hashes(folder) == before
    assert "not an oddetr run directory" in line
    assert not synthetic.exists()  # refused before any work


def test_resume_without_a_run_is_refused(tmp_path: Path, tiny_keys, capsys, stderr_lines) -> None:
    folder = _user_folder(tmp_path)
    before = _hashes(folder)
    line = _refused(["train", "--resume", f"output={folder}"], capsys, stderr_lines)
    assert "config.yaml" in line and str(folder) in line
    assert _hashes(folder) == before
    # a run directory whose checkpoint is gone
    (folder / "config.yaml").write_text("train: {epochs: 2}\n")
    (folder / "last.pt").unlink()
    before = _hashes(folder)
    line = _refused(["train", "--resume", f"output={folder}"], capsys, stderr_lines)
    assert "no checkpoint" in line and str(folder / "last.pt") in line
    assert _hashes(folder) == before


def test_output_that_is_a_file_is_refused(tmp_path: Path, tiny_keys, capsys, stderr_lines) -> None:
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    for extra in ([], ["overwrite=true"]):
        line = _refused(["train", *tiny_keys(f"data.synthetic.root={tmp_path / 's'}", f"output={target}", *extra)],
                        capsys, stderr_lines)
        assert "is a file" in line and str(target) in line
        assert target.read_text() == "a,b\n1,2\n"
