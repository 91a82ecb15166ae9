"""records/submission.py strip and pack --keep: marked blocks of optional systems removed or kept."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("submission", REPO / "records" / "submission.py")
submission = importlib.util.module_from_spec(spec)
sys.modules["submission"] = submission  # dataclasses look their module up by name
spec.loader.exec_module(submission)

SCRIPT = """\
import sys


def f(x):
    y = x
    # >>> ttt: score-first test-time training
    y = y + 1
    # <<< ttt

        # >>> deq
    y = y * 2
    # <<< deq
    return y


# >>> deq
DEQ = True
# <<< deq


if __name__ == "__main__":
    print(f(int(sys.argv[1])))
"""
MAIN = """

if __name__ == "__main__":
    print(f(int(sys.argv[1])))
"""
CORE = """\
import sys


def f(x):
    y = x

    return y
""" + MAIN
WITH_TTT = """\
import sys


def f(x):
    y = x
    y = y + 1

    return y
""" + MAIN
WITH_ALL = """\
import sys


def f(x):
    y = x
    y = y + 1

    y = y * 2
    return y


DEQ = True
""" + MAIN


def refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        submission.main(argv)
    assert "\n" not in str(exit_info.value)
    return str(exit_info.value)


def run(script, arg: str = "3") -> str:
    result = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train_gpt.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("keep, expected, result, summary", [
    ([], CORE, "3", "kept: core only; removed: deq, ttt"),
    (["ttt"], WITH_TTT, "4", "kept: ttt; removed: deq"),
    (["deq", "ttt", "deq"], WITH_ALL, "8", "kept: deq, ttt; removed: nothing"),
])
def test_strip_removes_the_blocks_not_kept_and_only_the_markers_of_kept_ones(tmp_path, script, capsys,
                                                                          keep, expected, result, summary):
    out = tmp_path / "out" / "stripped.py"
    submission.main(["strip", str(script), "-o", str(out), *(["--keep", *keep] if keep else [])])
    assert out.read_text() == expected
    assert capsys.readouterr().out == \
        f"wrote {out}: {len(expected.splitlines())} lines, {len(expected.encode())} bytes ({summary})\n"
    assert run(out) == result and run(script) == "8"
    assert submission.strip(SCRIPT, keep, script) == expected
    assert [f.name for f in out.parent.iterdir()] == ["stripped.py"]


def test_blank_lines_left_by_a_deletion_are_cut_to_two_and_to_none_at_the_end():
    text = "a = 1\n\n\n\nb = 2\n# >>> x\nc = 3\n# <<< x\n\n\n\nd = 4\n\n# >>> x\ne = 5\n# <<< x\n\n\n"
    # the core's own run of three blank lines stays; the run the deletion leaves goes to two
    assert submission.strip(text, [], "t.py") == "a = 1\n\n\n\nb = 2\n\n\nd = 4\n"
    assert submission.strip(text, ["x"], "t.py") == "a = 1\n\n\n\nb = 2\nc = 3\n\n\nd = 4\n\ne = 5\n"
    unmarked = "a = 1\n\n\n\nb = 2\n\n\n"
    assert submission.strip(unmarked, [], "t.py") == unmarked  # nothing deleted, nothing rewritten
    assert submission.strip("a = 1\n# >>> x\nb = 2\n# <<< x", [], "t.py") == "a = 1\n"


@pytest.mark.parametrize("text, line, message", [
    ("x = 1\n# >>> Deq\ny = 2\n# <<< Deq\n", 2, "'# >>> Deq' is not a block marker"),
    ("x = 1\n# >>>deq\ny = 2\n# <<< deq\n", 2, "'# >>>deq' is not a block marker"),
    ("x = 1  # >>> deq\ny = 2\n", 1, "'x = 1  # >>> deq' is not a block marker"),
    ("# >>> deq:\ny = 2\n# <<< deq\n", 1, "'# >>> deq:' is not a block marker"),
    ("# >>> deq\ny = 2\n# <<< deq: end\n", 3, "'# <<< deq: end' is not a block marker"),
    ("x = 1\n\n# >>> deq\ny = 2\n", 3, "block 'deq' is never closed"),
    ("x = 1\n    # <<< deq\n", 2, "'# <<< deq' closes no open block"),
    ("# >>> deq\n# >>> ttt\nx = 1\n# <<< ttt\n# <<< deq\n", 2,
     "block 'ttt' opens inside block 'deq' (opened on line 1); blocks do not nest"),
    ("# >>> deq\nx = 1\n# >>> deq\n# <<< deq\n", 3, "block 'deq' opens inside block 'deq'"),
    ("x = 1\n# >>> deq\nx = 2\n# <<< ttt\n", 4, "'# <<< ttt' closes block 'deq' (opened on line 2)"),
])
def test_malformed_markers_are_refused_with_the_line(tmp_path, text, line, message):
    bad, out = tmp_path / "bad.py", tmp_path / "out.py"
    bad.write_text(text)
    for argv in (["strip", str(bad), "-o", str(out)], ["strip", str(bad), "--list"],
                 ["pack", str(bad), "-o", str(out), "--keep"]):
        assert refusal(argv).startswith(f"error: {bad}:{line}: {message}")
    assert not out.exists()
    with pytest.raises(submission.SubmissionError, match=f"^{bad}:{line}: "):
        submission.marked_blocks(text, bad)


def test_an_unknown_system_is_refused_before_anything_is_written(tmp_path, script):
    out = tmp_path / "out.py"
    for command in ("strip", "pack"):
        assert refusal([command, str(script), "-o", str(out), "--keep", "ttt", "mod", "ema"]) == \
            f"error: {script}: no system named mod, ema; its systems are: deq, ttt"
    assert refusal(["strip", str(out.with_name("plain.py")), "-o", str(out), "--keep", "ttt"]).startswith("error: [Errno 2]")
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert refusal(["strip", str(tmp_path / "plain.py"), "-o", str(out), "--keep", "ttt"]) == \
        f"error: {tmp_path / 'plain.py'}: no system named ttt; its systems are: none"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["plain.py", "train_gpt.py"]


def test_a_strip_that_breaks_the_syntax_is_refused_and_writes_nothing(tmp_path):
    source, out = tmp_path / "s.py", tmp_path / "out.py"
    source.write_text("import os\n\n\ndef f():\n    # >>> deq\n    return 1\n    # <<< deq\n\n\n# >>> ttt\nX = 1\n# <<< ttt\n")
    message = (f"error: {source}: stripped (kept: ttt; removed: deq) it does not parse: "
               "line 7 of the stripped text: expected an indented block after function definition on line 4")
    assert refusal(["strip", str(source), "-o", str(out), "--keep", "ttt"]) == message
    assert refusal(["pack", str(source), "-o", str(out), "--keep", "ttt"]) == message
    assert not out.exists() and sorted(f.name for f in tmp_path.iterdir()) == ["s.py"]
    submission.main(["strip", str(source), "-o", str(out), "--keep", "deq"])
    assert out.read_text() == "import os\n\n\ndef f():\n    return 1\n"


def test_list_counts_each_system_and_the_core_and_writes_nothing(tmp_path, script, capsys):
    submission.main(["strip", str(script), "--list"])
    assert capsys.readouterr().out == "deq: 2 blocks, 2 lines\nttt: 1 block, 1 line\ncore: 13 lines\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["train_gpt.py"]
    assert submission.systems("x = 1\n", "t.py") == "core: 1 line"
    assert refusal(["strip", str(script)]) == "2"  # argparse: -o or --list is required


def test_out_is_never_the_source_and_never_half_written(tmp_path, script, monkeypatch):
    assert refusal(["strip", str(script), "-o", str(script)]).startswith("error: --out")
    (tmp_path / "link.py").symlink_to(script)
    assert refusal(["pack", str(script), "-o", str(tmp_path / "link.py"), "--keep"]).startswith("error: --out")
    assert script.read_text() == SCRIPT
    out = tmp_path / "out.py"
    out.write_text("old\n")

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(submission.os, "replace", fail)
    assert refusal(["strip", str(script), "-o", str(out)]) == "error: disk full"
    assert out.read_text() == "old\n" and sorted(f.name for f in tmp_path.iterdir()) == \
        ["link.py", "out.py", "train_gpt.py"]


def test_pack_with_keep_packs_the_stripped_source(tmp_path, script, capsys):
    for keep, expected in (([], CORE), (["ttt"], WITH_TTT)):
        stripped, packed = tmp_path / "stripped.py", tmp_path / "packed.py"
        submission.main(["strip", str(script), "-o", str(stripped), "--keep", *keep])
        submission.main(["pack", str(script), "-o", str(packed), "--keep", *keep])
        assert submission.unpack(packed.read_text()) == stripped.read_text() == expected
        assert run(packed) == run(stripped)
        assert capsys.readouterr().out.splitlines()[-1] == \
            f"{packed}: {packed.stat().st_size} bytes (readable source: {len(expected)} bytes; " \
            f"kept: {', '.join(keep) or 'core only'}; removed: {'deq, ttt' if not keep else 'deq'})"


def test_pack_without_keep_packs_the_whole_source_as_before(tmp_path, script, capsys):
    packed = tmp_path / "packed.py"
    submission.main(["pack", str(script), "-o", str(packed)])
    assert packed.read_text() == submission.pack(SCRIPT)
    assert submission.unpack(packed.read_text()) == SCRIPT and run(packed) == "8"
    assert capsys.readouterr().out == f"{packed}: {packed.stat().st_size} bytes (readable source: {len(SCRIPT)} bytes)\n"
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1  # >>> not a marker\n")  # without --keep the markers are not read
    submission.main(["pack", str(bad), "-o", str(packed)])
    assert submission.unpack(packed.read_text()) == bad.read_text()
