"""records/submission.py: strip and pack (marked blocks of optional systems removed or kept), and
make/stats: real run logs in, a submission folder out; refusals; the t-test."""
from __future__ import annotations

import argparse
import base64
import json
import lzma
import math
import os
import re
import shlex
import stat
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, TINY, run_script, submission

# ---- strip and pack, on a small marked script ------------------------------------------------

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


# ---- make and stats, on real run logs --------------------------------------------------------

RUN = {**TINY, "ITERATIONS": "6", "NUM_LAYER_SCHEDULE": "0:1,3:2", "VAL_LOSS_EVERY": "3", "TRAIN_LOG_EVERY": "1",
       "MAX_WALLCLOCK_SECONDS": "0", "WARMDOWN_ITERS": "2", "QUANT_BITS": "6", "COMPRESSOR": "zstd", "EVAL_STRIDE": "16"}


@pytest.fixture(scope="module")
def logs(tmp_path_factory, dataset):
    """Two seeds of one tiny configuration, run for real."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (7, 11):
        result = run_script(root, {**dataset, **RUN, "SEED": str(seed), "RUN_ID": f"seed{seed}"})
        assert result.returncode == 0, result.stderr[-2000:]
        paths.append(root / "logs" / f"seed{seed}.txt")
    return paths


def last(pattern: str, text: str) -> re.Match:
    return list(re.finditer(pattern, text, re.M))[-1]


@pytest.mark.slow
def test_make_writes_a_folder_that_matches_the_logs(tmp_path, logs):
    folder = submission.make(argparse.Namespace(
        logs=[str(p) for p in logs[::-1]], name="Tiny Shared Block: int6", author="A. Person", github_id="aperson",
        blurb="A test.", track="track_10min_16mb", date="2026-11-25", root=str(tmp_path), beat=None))
    assert folder == tmp_path / "track_10min_16mb" / "2026-11-25_Tiny_Shared_Block_int6"
    assert (folder / "train_gpt.py").read_bytes() == (REPO / "train_gpt.py").read_bytes()
    meta = json.loads((folder / "submission.json").read_text())
    assert meta["seeds"] == [7, 11] and meta["track"] == "track_10min_16mb" and meta["author"] == "A. Person"
    per_seed = {}
    for seed, path in zip((7, 11), logs):
        text = path.read_text()
        assert (folder / f"train_seed{seed}.log").read_text() == text
        score = last(r"^final_sliding_window_exact stride:16 val_loss:(\S+) val_bpb:(\S+)$", text)
        pre = last(r"^final_prequant_exact val_loss:(\S+) val_bpb:(\S+)$", text)
        total = int(last(r"^Total submission size int6\+zstd: (\d+) bytes$", text).group(1))
        got = meta["seed_results"][str(seed)]
        assert (got["val_loss"], got["val_bpb"]) == (float(score.group(1)), float(score.group(2)))
        assert (got["pre_quant_val_loss"], got["pre_quant_val_bpb"]) == (float(pre.group(1)), float(pre.group(2)))
        assert got["bytes_total"] == total and got["steps"] == 6
        per_seed[seed] = got
    bpbs = [per_seed[s]["val_bpb"] for s in (7, 11)]
    assert meta["val_bpb"] == pytest.approx(sum(bpbs) / 2, abs=1e-8)
    assert meta["val_bpb_std"] == pytest.approx(abs(bpbs[0] - bpbs[1]) / math.sqrt(2), abs=1e-8)
    assert meta["bytes_total"] == max(per_seed[s]["bytes_total"] for s in (7, 11))
    assert meta["bytes_code"] == len((REPO / "train_gpt.py").read_bytes())
    assert meta["score"] == "final_sliding_window_exact" and meta["export_format"] == "int6+zstd"
    assert meta["hardware"] == "1xcpu"
    readme = (folder / "README.md").read_text()
    assert "| 7 | 6 |" in readme and "| 11 | 6 |" in readme
    command = re.search(r"^SEED=<seed> .* torchrun --standalone --nproc_per_node=8 train_gpt.py$", readme, re.M).group(0)
    for setting in ("MODEL_DIM=32", "QUANT_BITS=6", "COMPRESSOR=zstd", "TORCH_COMPILE=0", "NUM_LAYER_SCHEDULE=0:1,3:2"):
        assert setting in command.split()
    assert "SEED=7" not in command and "RUN_ID" not in command and "NOISY_QAT" not in command  # defaults stay out
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary leftovers
    with pytest.raises(submission.SubmissionError, match="already exists"):
        submission.make(argparse.Namespace(
            logs=[str(logs[0])], name="Tiny Shared Block: int6", author="A", github_id="a", blurb="",
            track="track_10min_16mb", date="2026-11-25", root=str(tmp_path), beat=None))


def edited(tmp_path, path, old: str, new: str, name: str):
    text = path.read_text()
    assert old in text
    out = tmp_path / name
    out.write_text(text.replace(old, new, 1))
    return out


@pytest.mark.slow
def test_logs_that_disagree_are_refused(tmp_path, logs):
    a, b = logs
    same_length_edit = edited(tmp_path, b, "Shared-weight recurrent", "Shared-weight Recurrent", "code.txt")
    with pytest.raises(submission.SubmissionError, match="embeds different code"):
        submission.load_runs([str(a), str(same_length_edit)])
    with pytest.raises(submission.SubmissionError, match="differ in settings: model_dim"):
        submission.load_runs([str(a), str(edited(tmp_path, b, "\nmodel_dim:32\n", "\nmodel_dim:64\n", "config.txt"))])
    with pytest.raises(submission.SubmissionError, match="code is .* bytes, the run counted"):
        submission.load_runs([str(edited(tmp_path, a, "import copy\n", "import copy  \n", "longer.txt"))])
    with pytest.raises(submission.SubmissionError, match="a seed appears twice"):
        submission.load_runs([str(a), str(a)])
    with pytest.raises(submission.SubmissionError, match="no compliance line"):
        text = a.read_text()
        (tmp_path / "cut.txt").write_text(text[: text.index("\ncompliance ")])
        submission.load_runs([str(tmp_path / "cut.txt")])
    over = edited(tmp_path, a, ":ok val_tokens_trained_before_scoring", ":OVER val_tokens_trained_before_scoring", "over.txt")
    with pytest.raises(submission.SubmissionError, match="over the 16,000,000-byte cap"):
        submission.check_compliance(submission.load_runs([str(over)]), "track_10min_16mb")
    slow = edited(tmp_path, a, "ms/600000ms:ok eval_time", "ms/600000ms:OVER eval_time", "slow.txt")
    with pytest.raises(submission.SubmissionError, match="track_non_record_16mb"):
        submission.check_compliance(submission.load_runs([str(slow)]), "track_10min_16mb")
    submission.check_compliance(submission.load_runs([str(slow)]), "track_non_record_16mb")


@pytest.mark.slow
def test_cli_refusals_are_one_line(tmp_path, logs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        submission.main(["make", str(logs[0]), "--name", "x", "--author", "a", "--github-id", "a",
                         "--date", "25/11/2026", "--root", str(tmp_path)])
    assert str(exit_info.value) == "error: --date '25/11/2026' is not YYYY-MM-DD"
    with pytest.raises(SystemExit) as exit_info:
        submission.main(["stats", str(logs[0]), "--beat", "3.0"])
    assert "at least two seeds" in str(exit_info.value)
    submission.main(["stats", *map(str, logs), "--beat", "9.0"])
    out = capsys.readouterr().out
    assert "| **Mean** |" in out and "df = 1" in out and "significant at p < 0.01" in out


# Student-t upper tails from published tables: P(T > t) for (t, df).
T_TABLE = [(2.919986, 2, 0.05), (6.964557, 2, 0.01), (2.131847, 4, 0.05), (2.228139, 10, 0.025),
           (5.893430, 5, 0.001), (2.749996, 30, 0.005), (1.959964, 1e7, 0.025), (0.0, 3, 0.5)]


@pytest.mark.parametrize("t,df,p", T_TABLE)
def test_student_t_tail_matches_tables(t, df, p):
    assert submission.student_t_sf(t, df) == pytest.approx(p, rel=2e-5, abs=1e-9)
    assert submission.student_t_sf(-t, df) == pytest.approx(1 - p, rel=2e-5)


def test_student_t_tail_matches_closed_forms_and_scipy():
    for t in (0.1, 0.7, 1.5, 4.0, 31.42, 250.0):
        cauchy = 0.5 - math.atan(t) / math.pi  # df = 1
        two = 0.5 * (1 - t / math.sqrt(t * t + 2))  # df = 2
        assert submission.student_t_sf(t, 1) == pytest.approx(cauchy, rel=1e-10)
        assert submission.student_t_sf(t, 2) == pytest.approx(two, rel=1e-10)
    # The challenge's own example (LongContextSeq2048 record): t = 31.42, df = 2, p = 0.00051.
    assert submission.student_t_sf(31.42, 2) == pytest.approx(0.00051, abs=5e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    for t, df in ((1.3, 2), (3.7, 4), (0.4, 9), (12.0, 3), (-2.0, 6)):
        assert submission.student_t_sf(t, df) == pytest.approx(float(scipy_stats.t.sf(t, df)), rel=1e-10)


def test_significance_is_the_one_sided_test_against_previous_minus_margin():
    losses = [1.90, 1.91, 1.92]
    sig = submission.significance(losses, previous=1.95)
    t = (1.95 - 0.005 - 1.91) / (statistics.stdev(losses) / math.sqrt(3))
    assert sig["t"] == pytest.approx(t) and sig["df"] == 2
    assert sig["p"] == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), rel=1e-8)
    assert submission.significance(losses, previous=1.912)["p"] > 0.5  # within the margin: no evidence


@pytest.mark.slow
def test_plot_writes_a_png_or_says_how_to_get_matplotlib(tmp_path, logs, monkeypatch):
    runs = submission.load_runs([str(p) for p in logs])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(submission.SubmissionError, match="pip install matplotlib"):
        submission.plot(runs, tmp_path / "x.png")
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    submission.plot(runs, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


@pytest.mark.slow
def test_packed_script_runs_identically_and_counts_its_own_bytes(tmp_path, dataset):
    import os
    import subprocess
    packed = tmp_path / "packed" / "train_gpt.py"
    submission.main(["pack", str(REPO / "train_gpt.py"), "-o", str(packed)])
    readable = (REPO / "train_gpt.py").read_text()
    assert submission.unpack(packed.read_text()) == readable
    assert packed.stat().st_size < 0.5 * len(readable.encode())
    env = {**os.environ, "OMP_NUM_THREADS": "2", **dataset, **RUN, "ITERATIONS": "3", "RUN_ID": "p"}
    outs = {}
    for name, script in (("readable", REPO / "train_gpt.py"), ("packed", packed)):
        (tmp_path / name).mkdir(exist_ok=True)
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path / name, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outs[name] = result.stdout
    strip = lambda out: [re.sub(r"(train_time|eval_time|step_avg|tokens_per_s):\S+", "", l) for l in out.splitlines()
                         if l.startswith(("step:", "final_", "quant_gap"))]
    assert strip(outs["readable"]) == strip(outs["packed"]) and len(strip(outs["packed"])) > 8
    code_bytes = int(re.search(r"\(code:(\d+) bytes\)", outs["packed"]).group(1))
    assert code_bytes == packed.stat().st_size
    # the submission folder ships the packed file and the source it came from
    folder = submission.make(argparse.Namespace(
        logs=[str(tmp_path / "packed" / "logs" / "p.txt")], name="Packed", author="A", github_id="a", blurb="",
        track="track_10min_16mb", date="2026-11-25", root=str(tmp_path / "records"), beat=None))
    assert (folder / "train_gpt.py").read_bytes() == packed.read_bytes()
    assert (folder / "train_gpt_readable.py").read_text() == readable


def with_code(tmp_path, log, code: str, name: str):
    """`log` with `code` as its embedded code, and the code-byte count to match."""
    text = log.read_text()
    text = code + text[text.index(f"\n{submission.SEPARATOR}\n"):]
    text = re.sub(r"\(code:\d+ bytes\)$", f"(code:{len(code.encode())} bytes)", text, flags=re.M)
    (tmp_path / name).write_text(text)
    return tmp_path / name


def make_cli(log, root, name="X") -> list[str]:
    return ["make", str(log), "--name", name, "--author", "a", "--github-id", "a", "--date", "2026-11-25",
            "--root", str(root)]


def reproduce_command(folder) -> str:
    return re.search(r"^SEED=<seed> .*$", (folder / "README.md").read_text(), re.M).group(0)


@pytest.mark.slow
def test_make_runs_nothing_from_the_logs(tmp_path, logs):
    # The launch command's defaults are read from the embedded source as text; running it would run
    # whatever a crafted log carries, here a line that leaves a file behind when imported.
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    code = (REPO / "train_gpt.py").read_text()
    plain = with_code(tmp_path, logs[0], code + payload, "plain.txt")
    packed = with_code(tmp_path, logs[0], submission.pack(code + payload), "packed.txt")
    reference = submission.make(argparse.Namespace(
        logs=[str(logs[0])], name="Reference", author="A", github_id="a", blurb="", track="track_10min_16mb",
        date="2026-11-25", root=str(tmp_path / "records"), beat=None))
    for log in (plain, packed):
        folder = submission.make(argparse.Namespace(
            logs=[str(log)], name=log.stem, author="A", github_id="a", blurb="", track="track_10min_16mb",
            date="2026-11-25", root=str(tmp_path / "records"), beat=None))
        assert not marker.exists()
        assert reproduce_command(folder) == reproduce_command(reference)
    assert (folder / "train_gpt_readable.py").read_text() == code + payload


def test_defaults_are_read_from_the_source_as_written():
    import train_gpt
    defaults = submission.script_defaults((REPO / "train_gpt.py").read_text(), REPO / "train_gpt.py")
    expected = {k: str(v) for k, v in vars(train_gpt.Hyperparameters({})).items()}
    assert defaults == {k: v for k, v in expected.items() if k != "run_id"}  # a fresh uuid: always named
    source = ("class Hyperparameters:\n    def __init__(self, env):\n"
              "        self.a = self._get('A', 4)\n        self.b = self._get('B', self.a)\n"
              "        self.c = self._get('C', min(64, self.b))\n        self.d = self._get('D', str(uuid.uuid4()))\n"
              "        self.e = self._get('E', max(self.d, 1))\n        self.f = self._get('F', open('x').read())\n"
              "        self.g = self._get('G', 2, '[0,)')\n"
              "        self.h = self._get('H', 'x' if self.a == 4 else 'y')\n"
              "        self.i = self._get('I', 1 if self.g != 2 else self.a)\n")
    assert submission.script_defaults(source, REPO) == {"a": "4", "b": "4", "c": "4", "g": "2", "h": "x", "i": "4"}
    with pytest.raises(submission.SubmissionError, match="embedded code is not Python"):
        submission.script_defaults("def (:\n", REPO)


@pytest.mark.slow
def test_packed_code_that_unpacks_too_far_or_not_at_all_is_refused(tmp_path, logs):
    compressor = lzma.LZMACompressor(preset=0)
    chunk = bytes(1 << 20)
    blob = b"".join(compressor.compress(chunk) for _ in range(17)) + compressor.flush()  # 3 kB -> 17.8 MB
    pack = lambda data: f'{submission.PACKED_PREFIX}"{base64.b85encode(data).decode()}")))\n'
    with pytest.raises(submission.SubmissionError, match="unpacks to more than 16,000,000 bytes"):
        submission.unpack(pack(blob))
    bomb = with_code(tmp_path, logs[0], pack(blob), "bomb.txt")
    assert refusal(make_cli(bomb, tmp_path / "records")) == \
        f"error: {bomb}: the packed code unpacks to more than 16,000,000 bytes"
    assert not (tmp_path / "records").exists()
    broken = (submission.PACKED_PREFIX + '"not base85 \\")))\n', pack(b"not lzma data"),
              pack(lzma.compress(b"print(1)\n" * 100)[:-8]), pack(lzma.compress(b"x") + b"trailing"),
              pack(lzma.compress(b"\xff\xfe")))
    for code in broken:
        with pytest.raises(submission.SubmissionError, match="the packed code (is not|does not)"):
            submission.unpack(code)


@pytest.mark.slow
def test_a_log_that_holds_two_runs_is_refused(tmp_path, logs):
    # Older train_gpt.py versions appended a rerun under the same RUN_ID to the same log.
    first, second = logs[0].read_text(), logs[1].read_text()
    interrupted = first[: first.index("\nval_bpb:enabled")] + "\n"
    for name, text in (("twice.txt", first + second), ("rerun.txt", interrupted + first)):
        (tmp_path / name).write_text(text)
        expected = f"error: {tmp_path / name}: holds more than one run (a reused RUN_ID?); give each run its own log"
        assert refusal(["stats", str(tmp_path / name)]) == expected
        assert refusal(make_cli(tmp_path / name, tmp_path / "records")) == expected
    assert not (tmp_path / "records").exists()


@pytest.mark.slow
def test_log_content_that_would_crash_or_misdirect_is_refused_in_one_line(tmp_path, logs):
    a = logs[0]
    text = a.read_text()
    score = last(r"^final_sliding_window_exact stride:16 val_loss:\S+ val_bpb:(\S+)$", text)
    cases = {
        "seed.txt": (text.replace("\nseed:7\n", "\nseed:../../x\n"), "seed, or one that is not a whole number"),
        "nan.txt": (text[: score.start(1)] + "nan" + text[score.end(1):], "val_bpb is 'nan', not a finite number"),
        "word.txt": (text[: score.start(1)] + "low" + text[score.end(1):], "val_bpb is 'low', not a finite number"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        assert refusal(make_cli(tmp_path / name, tmp_path / "records")).startswith(f"error: {tmp_path / name}: ")
        with pytest.raises(submission.SubmissionError, match=re.escape(message)):
            submission.load_runs([str(tmp_path / name)])
    (tmp_path / "bytes.txt").write_bytes(a.read_bytes() + b"\xff\n")
    assert refusal(["stats", str(tmp_path / "bytes.txt")]) == \
        f"error: {tmp_path / 'bytes.txt'}: not a train_gpt.py log (not UTF-8 text)"
    assert refusal(make_cli(a, tmp_path / "records", name="...")).startswith("error: --name '...' has no letters")
    nested = tmp_path / "a" / "b" / "records"
    with pytest.raises(submission.SubmissionError, match="--track '../x' is not one of"):
        submission.make(argparse.Namespace(logs=[str(a)], name="X", author="A", github_id="a", blurb="",
                                           track="../x", date="2026-11-25", root=str(nested), beat=None))
    assert not (tmp_path / "records").exists() and not (tmp_path / "a").exists()
    missing = refusal(["pack", str(tmp_path / "missing.py"), "-o", str(tmp_path / "out.py")])
    assert missing.startswith("error: [Errno 2]")


@pytest.mark.slow
def test_lines_after_the_settings_are_not_settings(tmp_path, logs):
    warning = "WARNING: TTT_EPOCHS is not a setting of this script and is ignored (closest: TTT_STEPS)"
    log = tmp_path / "seed7.txt"
    log.write_text(logs[0].read_text().replace("\nval_bpb:enabled", f"\n{warning}\nval_bpb:enabled", 1))
    config = submission.load_runs([str(log)])[0].config
    assert config == submission.load_runs([str(logs[0])])[0].config and "seed" in config and "WARNING" not in config


@pytest.mark.slow
def test_the_launch_command_quotes_logged_values_for_a_shell(tmp_path, logs):
    value = "/data/sp $(touch pwned); echo 'x'"
    log = tmp_path / "seed7.txt"
    log.write_text(re.sub(r"^data_path:.*$", f"data_path:{value}", logs[0].read_text(), count=1, flags=re.M))
    folder = submission.make(argparse.Namespace(
        logs=[str(log)], name="Quoted", author="A", github_id="a", blurb="", track="track_10min_16mb",
        date="2026-11-25", root=str(tmp_path / "records"), beat=None))
    words = shlex.split(reproduce_command(folder))
    assert words[-4:] == ["torchrun", "--standalone", "--nproc_per_node=8", "train_gpt.py"]
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w, re.S) for w in words[:-4])
    assert "DATA_PATH=./data/datasets/sp $(touch pwned); echo 'x'" in words and "MODEL_DIM=32" in words


@pytest.mark.slow
def test_the_folder_and_its_files_have_the_modes_of_a_plain_mkdir_and_open(tmp_path, logs):
    # mkdtemp makes its folder 0700; a submission folder should read like the challenge's records.
    for mask in (0o022, 0o027):
        previous = os.umask(mask)
        try:
            folder = submission.make(argparse.Namespace(
                logs=[str(p) for p in logs], name=f"Mode {mask:o}", author="A", github_id="a", blurb="",
                track="track_10min_16mb", date="2026-11-25", root=str(tmp_path), beat=None))
            assert os.umask(mask) == mask  # make left the umask as it found it
        finally:
            os.umask(previous)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        files = list(folder.iterdir())
        assert len(files) >= 5 and all(p.is_file() and stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in files)


@pytest.mark.slow
def test_the_launch_command_names_the_challenges_data_paths_not_this_machines(logs):
    # The logs hold this machine's absolute paths (tmp_path's local_sp512 and local_512_bpe.model).
    runs = submission.load_runs([str(p) for p in logs])
    assert runs[0].config["data_path"].startswith("/")
    words = shlex.split(submission.launch_command(runs[0].code, runs))
    assert "DATA_PATH=./data/datasets/local_sp512" in words
    assert "TOKENIZER_PATH=./data/tokenizers/local_512_bpe.model" in words
    logged = runs[0].config["data_path"], runs[0].config["tokenizer_path"]
    assert not [w for w in words if "=/" in w or any(path in w for path in logged)]


def test_data_paths_at_the_scripts_defaults_are_left_out():
    # The challenge's layout with the default names: nothing to name, however the default is spelled.
    run = SimpleNamespace(path=REPO / "train_gpt.py", config={
        "seed": "1", "run_id": "r", "data_path": "/home/me/pg/data/datasets/fineweb10B_sp1024",
        "tokenizer_path": "/mnt/tok/fineweb_1024_bpe.model"})
    assert submission.launch_command((REPO / "train_gpt.py").read_text(), [run]) == \
        "SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py"
    source = ("class Hyperparameters:\n    def __init__(self, env):\n"
              "        self.data_path = self._get('DATA_PATH', 'data/datasets/fineweb10B_sp1024/')\n"
              "        self.tokenizer_path = self._get('TOKENIZER_PATH', './data/tokenizers/fineweb_1024_bpe.model')\n")
    assert submission.launch_command(source, [run]).startswith("SEED=<seed> torchrun ")
    run.config["tokenizer_path"] = "/mnt/tok/fineweb_8192_bpe.model"
    assert submission.launch_command(source, [run]) == ("SEED=<seed> TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe.model "
                                                         "torchrun --standalone --nproc_per_node=8 train_gpt.py")


@pytest.mark.slow
def test_plot_skips_loss_values_that_are_not_numbers(tmp_path, logs):
    pytest.importorskip("matplotlib")
    log = tmp_path / "seed7.txt"
    log.write_text(logs[0].read_text() + "step:7/6 train_loss:oops step_avg:1ms\nstep:7/6 val_loss:x val_bpb:- x\n")
    submission.plot(submission.load_runs([str(log)]), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
