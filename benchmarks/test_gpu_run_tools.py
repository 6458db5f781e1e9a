"""The GPU run's tooling, checked on the CPU: the table's formatting and its FlexAttention, model
and cost-model plumbing (gpu_report.py), the commit stamp (run_stamp.py) and the error-path
probe's parsing (error_path_probe.py). A lent GPU is short; these parts must not be what fails."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import error_path_probe
import gpu_report
import run_stamp
from gpu_report import Row


def test_valid_pairs_counts_in_volume_keys():
    volume = (3, 5, 4)
    left = (gpu_report.SEARCH - gpu_report.WINDOW) // 2
    brute = 0
    for q in itertools.product(*(range(n) for n in volume)):
        for k in itertools.product(*(range(n) for n in volume)):
            brute += all(0 <= kc - (qc // gpu_report.WINDOW) * gpu_report.WINDOW + left < gpu_report.SEARCH
                         for qc, kc in zip(q, k))
    assert gpu_report.valid_pairs(volume) == brute


def test_table_has_the_commit_on_every_row_and_ratios_to_the_reference():
    stage = next(iter(gpu_report.STAGES))
    rows = [
        Row(stage, "bfloat16", "reference", forward_ms=4.0, train_ms=9.0, forward_mb=900.0, train_mb=1200.0),
        Row(stage, "bfloat16", "cuda", forward_ms=0.5, forward_graph_ms=0.3, train_ms=1.5, train_graph_ms=1.0,
            forward_mb=8.0, train_mb=30.0, predicted=("0.100", "err:ValueError")),
        Row(stage, "bfloat16", "triton", error="BACKEND UNAVAILABLE: no Triton"),
        Row("model 144x144x128", "bf16 autocast", "reference", train_ms=480.0, train_mb=30000.0),
        Row("model 144x144x128", "bf16 autocast", "cuda", train_ms=120.0, train_mb=9000.0, note="one step"),
    ]
    lines = gpu_report.format_table(rows, bandwidth=4e12, flop_rate=8e14, with_model=True, commit="abc1234+dirty")
    body = [line for line in lines[2:] if "note:" not in line]
    assert len(body) == len(rows) and all("abc1234+dirty" in line for line in body)
    cuda = next(line for line in body if line.startswith(stage) and " cuda " in line).split()
    first = cuda.index("cuda") + 1
    assert cuda[first:first + 4] == ["0.500", "0.300", "1.500", "1.000"]
    assert "8.0" in cuda and "6.0" in cuda and "0.100" in cuda and "err:ValueError" in cuda  # 9.0 / 1.5 = 6.0x the reference
    assert "BACKEND UNAVAILABLE: no Triton" in next(line for line in body if "triton" in line)
    assert any("note: one step" in line for line in lines)
    model = next(line for line in body if line.startswith("model") and " cuda " in line).split()
    assert "4.0" in model  # 480 / 120: the model rows' ratio is to the model's reference step
    assert "model fwd" in lines[0]
    assert "model fwd" not in gpu_report.format_table(rows, 4e12, 8e14, with_model=False, commit="x")[0]


def _flex_files(directory, status=None, rows=None):
    for name, data in (("status.json", status), ("rows.json", rows)):
        if data is not None:
            (directory / name).write_text(json.dumps(data))


def test_flex_rows_from_the_background_process(tmp_path):
    stage1, stage2 = list(gpu_report.STAGES)
    _flex_files(
        tmp_path,
        status={f"{stage1}|forward": {"state": "compiled", "compile_s": 40.0, "block_mask_s": 0.5},
                f"{stage1}|forward+backward": {"state": "compiled", "compile_s": 70.0},
                f"{stage2}|forward": {"state": "failed", "error": "RuntimeError: boom"},
                f"{stage2}|forward+backward": {"state": "compiling", "since_s": 250}},
        rows={f"{stage1}|forward": {"ms": 0.8, "mb": 10.0, "rel_error_vs_reference": 0.004},
              f"{stage1}|forward+backward": {"ms": 2.5, "mb": 50.0}},
    )
    first, second = gpu_report.flex_rows(str(tmp_path), wait_s=0)
    assert (tmp_path / "go").exists() and (tmp_path / "closed").exists()
    assert (first.forward_ms, first.train_ms, first.train_mb) == (0.8, 2.5, 50.0) and not first.error
    assert "4.0e-03" in first.note and "block mask built once in 0.5 s" in first.note
    assert "RuntimeError: boom" in second.error and "still compiling" in second.error


def test_flex_rows_without_a_report(tmp_path):
    rows = gpu_report.flex_rows(str(tmp_path), wait_s=0)  # the background process never wrote anything
    assert len(rows) == len(gpu_report.STAGES)
    assert all("no report from flex_attention_rows.py" in row.error for row in rows)


def test_cost_model_is_optional_and_never_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "cost_model", None)  # import fails as "absent"
    predict, line = gpu_report.load_cost_model()
    assert predict is None and "absent" in line
    monkeypatch.setitem(sys.modules, "cost_model", types.SimpleNamespace())
    predict, line = gpu_report.load_cost_model()
    assert predict is None and "no predict(" in line

    def predict(backend, shape, dtype, mode):
        assert dtype == "bf16"
        if backend == "triton":
            return None  # no model for it
        if mode == "forward+backward":
            raise ValueError("not modelled")
        return 0.25

    monkeypatch.setitem(sys.modules, "cost_model", types.SimpleNamespace(predict=predict))
    loaded, line = gpu_report.load_cost_model()
    shape = (2, 36, 36, 32, 3, 16)
    assert gpu_report.predictions(loaded, "cuda", shape, torch.bfloat16) == ("0.250", "err:ValueError")
    assert gpu_report.predictions(loaded, "triton", shape, torch.bfloat16) == (None, None)


def test_model_rows_keep_what_the_child_printed(monkeypatch):
    printed = "\n".join([
        "some log line",
        json.dumps({"backend": "reference", "step_ms": 900.0, "peak_gib": 20.0, "finite": True, "parameters_m": 14.8}),
        json.dumps({"backend": "triton", "error": "OutOfMemoryError: CUDA out of memory"}),
    ])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -11, printed, "Segmentation fault"))
    rows = {row.backend: row for row in gpu_report.model_rows(deadline=float("inf"), size=(16, 16, 16))}
    assert rows["reference"].train_ms == 900.0 and rows["reference"].train_mb == 20.0 * 1024
    assert "OutOfMemoryError" in rows["triton"].error
    assert rows["cuda"].error.startswith("no figures (exit -11")


def test_stamp_labels_a_tree_without_git(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(run_stamp, "ROOT", str(tmp_path))
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run_stamp.commit_label() == head
    (tmp_path / "b.txt").write_text("untracked\n")
    stamp = run_stamp.write_stamp()
    assert stamp["label"] == head + "+dirty" and set(stamp["files"]) == {"a.txt", "b.txt"}
    monkeypatch.setattr(run_stamp, "_git", lambda *args: None)  # as on the GPU machine: no .git
    assert run_stamp.commit_label() == head + "+dirty"
    (tmp_path / "a.txt").write_text("two\n")
    assert run_stamp.commit_label().startswith(head + "+dirty (1 files differ from the stamp")
    os.remove(tmp_path / run_stamp.STAMP)
    assert run_stamp.commit_label() == "unknown"


def test_probe_reads_outcomes_and_build_logs(tmp_path):
    assert error_path_probe.outcome(-11, "") == "CRASH (signal 11, SIGSEGV)"
    assert error_path_probe.outcome(None, "") == "TIMED OUT"
    assert error_path_probe.outcome(0, "RESULT RuntimeError: head_dim must be at most 128", "head_dim").startswith("ok")
    assert "not the expected error" in error_path_probe.outcome(0, "RESULT RuntimeError: other", "head_dim")
    assert error_path_probe.outcome(0, "RESULT no error raised").startswith("ok, no error")  # reported as such
    log = tmp_path / "build.txt"
    log.write_text(
        "[1/3] c++ -MMD -MF x.o.d -c /src/a.cpp -o /b/a.o -std=c++17\n"
        "[2/3] /usr/local/cuda/bin/nvcc -c /src/k.cu -o /b/k.cuda.o -O3\n"
        "x86_64-linux-gnu-g++ -shared -Wl,-O1 /b/a.o /b/k.cuda.o -L/t/lib -lc10 -fopenmp -o build/lib/_C.so\n")
    commands = error_path_probe.build_log_commands(str(log))
    assert commands["cxx"][0] == "c++" and commands["nvcc"][0].endswith("nvcc") and commands["link"][0] == "x86_64-linux-gnu-g++"
    variants = error_path_probe.extension_variants({"log": commands, "nvcc_host": "/opt/gcc/bin/gcc"})
    as_built = variants["as setup.py builds"]
    assert as_built["link"] == ["x86_64-linux-gnu-g++", "-shared", "-Wl,-O1"] and "-fopenmp" in as_built["link_flags"]
    assert variants["all by nvcc's host compiler"]["cxx"] == ["/opt/gcc/bin/g++"]
    assert error_path_probe.cxx_sibling("/usr/bin/x86_64-linux-gnu-gcc") == "/usr/bin/x86_64-linux-gnu-g++"


def test_eh_frame_hdr_of_a_shared_library():
    library = next((path for path in ("/lib/x86_64-linux-gnu/libgcc_s.so.1", "/usr/lib64/libgcc_s.so.1") if os.path.exists(path)), None)
    if library is None or subprocess.run(["which", "readelf"], capture_output=True).returncode:
        pytest.skip("needs readelf and libgcc_s")
    assert "search table with" in error_path_probe.eh_frame_hdr_table(library)
