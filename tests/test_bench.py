"""bench/: gpu_check.py's CPU smoke run of the record check prints the GPU run's columns (compiled
with the real Inductor backend at both depths, without a recompile), its judgments of logs, a
broken check failing by name; golf.py warns about a look-alike setting before running; record_parity.py
decodes the record's packed script and refuses one its CPU edits do not fit."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def run(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--work", str(tmp_path / "work"),
                           *args], env={**full, "OMP_NUM_THREADS": "2", **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def rows(out: str) -> dict[str, list[dict[str, str]]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    table: dict[str, list[dict[str, str]]] = {}
    for line in lines[1:]:
        row = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        table.setdefault(row["check"], []).append(row)
    return table


@pytest.mark.slow
def test_smoke_run_passes_every_check_with_inductor_and_no_recompiles(tmp_path):
    cache = tmp_path / "inductor"
    # For the suite's time, only the record check runs: the other checks' runs are other tests'
    # (test_end_to_end.py's PR #1783 and evaluation runs, test_gptq.py's), their rows are judged below.
    result = run(tmp_path, "--only", "record", env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    table = rows(result.stdout)
    assert list(table) == ["record_d1", "record_d2"]
    assert all(r["result"] == "pass" for rs in table.values() for r in rs)
    for depth in (1, 2):
        (row,) = table[f"record_d{depth}"]
        assert row["depth"] == str(depth) and float(row["ms/step"]) > 0 and float(row["TFLOP/s"]) > 0
        assert int(row["graphs"]) > 0 and row["recompiles"] == "0"  # compiled, and nothing after the warmup
        assert len(row["first losses"].split(",")) == 3
    # The compiled run used Inductor: its log says compile:True and Inductor wrote C++ kernels.
    log = (tmp_path / "work" / "record" / "logs" / "record.txt").read_text()
    assert "device:cpu compile:True autocast_bf16:False" in log
    assert list(cache.rglob("*.cpp")) or list(cache.rglob("*.so"))
    assert re.search(r"^final_sliding_window_exact stride:8 ", log, re.M)


@pytest.mark.slow
def test_the_looped_record_check_compiles_both_depths_with_inductor_and_no_recompiles(tmp_path):
    result = run(tmp_path, "--only", "looped", env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    looped = rows(result.stdout)["looped"]
    assert [(r["depth"], r["result"], r["recompiles"]) for r in looped] == [("1", "pass", "0"), ("3", "pass", "0")]
    log = (tmp_path / "work" / "looped" / "logs" / "looped.txt").read_text()
    assert "layer_plan depth:1 layers:11 " in log and "layer_plan depth:3 layers:17 " in log
    assert "device:cpu compile:True" in log


def test_a_deq_run_gives_a_row_per_phase_and_the_solve_is_named():
    check = next(c for c in gpu_check.plan(smoke=True) if c.name == "deq")
    log = "".join(f"step:{s}/4 train_loss:{6 - s / 10:.4f} train_time:{s}ms step_avg:1.00ms\n" for s in range(1, 5))
    log += ("phase_end depth:1 steps:2 phase_step_avg:66.6ms\n"
            "deq_solve_start step:2 deq_iters:4 eval_deq_iters:6 anderson_m:5 phantom_steps:4\n"
            "phase_end depth:1 steps:2 phase_step_avg:237.9ms\n"
            "deq_residual eval_deq_iters:6 residual:0.0100\ncompliance ...\n")
    rows = gpu_check.judge(check, log, None, None)
    assert [(r["depth"], r["ms_step"], r["losses"], r["result"]) for r in rows] == \
        [("1", "66.6", "5.900,5.800", "pass"), ("1 solve", "237.9", "5.700,5.600", "pass")]


@pytest.mark.slow
def test_a_broken_check_fails_by_name(tmp_path):
    result = run(tmp_path, "--only", "deq", env={"ANDERSON_M": "0"})
    assert result.returncode == 1
    (row,) = rows(result.stdout)["deq"]
    assert row["result"] == "FAIL" and "ANDERSON_M=0" in row["note"]
    assert result.stderr.strip().splitlines()[-1] == "FAILED: deq"


def test_device_peaks_are_named():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.4  # SXM
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert gpu_check.peak_tflops("Tesla T4", None)[0] is None
    assert gpu_check.peak_tflops("Tesla T4", 65.0) == (65.0, "Tesla T4 (--peak-tflops 65)")


def test_an_evaluation_that_finished_passes_when_a_later_one_times_out():
    check = next(c for c in gpu_check.plan(smoke=True) if c.name == "eval")
    log = ("compile_stats unique_graphs:0 recompiles_after_warmup:0\n"
           "final_sliding_window stride:8 val_loss:2.5 val_bpb:1.5000 eval_time:120ms\n")
    rows = {r["check"]: r for r in gpu_check.judge(check, log, "timed out after 300s", None)}
    assert rows["sliding_eval"]["result"] == "pass" and rows["sliding_eval"]["note"] == "eval 120ms val_bpb 1.5000"
    assert rows["ttt_eval"] == {**rows["ttt_eval"], "result": "FAIL", "note": "timed out after 300s"}
    # Finished, but with a NaN score: everything fails.
    nan = log.replace("val_bpb:1.5000", "val_bpb:nan") + "compliance ...\n"
    assert {r["result"] for r in gpu_check.judge(check, nan, None, None)} == {"FAIL"}


def test_a_record_run_without_its_lines_fails():
    record = gpu_check.plan(smoke=True)[0]
    (row,) = gpu_check.judge(record, "model_params:1\n", None, None)
    assert row["result"] == "FAIL" and "recompiles_after_warmup:0" in row["note"]


def test_relative_data_paths_reach_the_runs_as_absolute_paths(tmp_path, dataset, monkeypatch):
    # Each check runs in its own folder, so a relative --tokenizer-path would name nothing there.
    data, tokenizer = Path(dataset["DATA_PATH"]), Path(dataset["TOKENIZER_PATH"])
    monkeypatch.chdir(data.parent)
    env = gpu_check.prepare_data(tmp_path / "work", False, Path(data.name), Path(tokenizer.name), 1000)
    monkeypatch.chdir(tmp_path)
    assert Path(env["TOKENIZER_PATH"]) == tokenizer and Path(env["TOKENIZER_PATH"]).is_file()
    assert sorted(Path(env["DATA_PATH"]).glob("fineweb_*_000000.bin")) and env["VOCAB_SIZE"] == "512"


def test_the_gptq_check_needs_rounded_matrices_and_reports_their_time():
    check = next(c for c in gpu_check.plan(smoke=True) if c.name == "gptq")
    assert check.env["QUANT_METHOD"] == "gptq" and check.env["QUANT_BITS"] == "6"
    log = ("phase_end depth:2 steps:4 phase_step_avg:548.4ms\n"
           "gptq calibration:train_tokens seqs:8 tokens:256 depth:2 matrices:{n} act_order:True damp:0.01 "
           "time:1372ms train_time_with_gptq:2000ms\ncompliance ...\n")
    (row,) = gpu_check.judge(check, log.format(n=2), None, None)
    assert row["result"] == "pass" and row["note"] == "GPTQ 1372ms for 2 matrices" and row["ms_step"] == "548.4"
    (row,) = gpu_check.judge(check, log.format(n=0), None, None)  # nothing rounded: the check failed
    assert row["result"] == "FAIL" and "matrices" in row["note"]


def test_golf_warns_about_a_lookalike_before_running(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import golf
    script = tmp_path / "noop.py"
    script.write_text("")
    with pytest.raises(SystemExit, match="did not finish"):
        golf.main(["--config", "typo NUM_LAYERS_SCHEDULE=0:9", "--out", str(tmp_path / "out"), "--script", str(script)])
    assert "typo: WARNING: NUM_LAYERS_SCHEDULE is not a setting of this script and is ignored " \
           "(closest: NUM_LAYER_SCHEDULE)" in capsys.readouterr().out


def test_record_parity_decodes_a_packed_script_and_refuses_one_its_edits_do_not_fit(tmp_path):
    import base64
    import lzma

    import record_parity
    source = ("import torch\ndef main():\n    if not torch.cuda.is_available():raise RuntimeError('CUDA is required')\n"
              "    device=torch.device('cuda',local_rank)\n    model=GPT(h).to(device).bfloat16()\n"
              "    return torch.device('cuda', h.local_rank)\n")
    raw = lzma.compress(source.encode(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    packed = tmp_path / "train_gpt.py"
    packed.write_text(f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{base64.b85encode(raw).decode()}"),'
                      'format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n')
    assert record_parity.decode(packed) == source
    cpu = record_parity.for_cpu(source)
    body = cpu[len(record_parity.PRELUDE):]
    assert "'cuda'" not in body and "bfloat16" not in body and "is_available" not in body
    assert body.count("torch.device('cpu')") == 2 and "if False:" in body
    compile(cpu, "record_cpu.py", "exec")
    with pytest.raises(SystemExit, match="no match for fp32 weights"):
        record_parity.for_cpu(source.replace(".bfloat16()", ""))
