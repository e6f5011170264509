"""What a person sees: library noise filtered at the descriptors, plain lines in a log, heartbeats,
estimates from the last run, live bars on a terminal, the top-level help and the end-of-run summary."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from exporter import terminal
from exporter.cli import TARGET_CHOICES, cli, summary_rows
from exporter.progress import task

ROOT = Path(__file__).resolve().parent.parent

# What a library writes: known noise (Python warning with its source line, C++ log, torchao probe),
# a real warning, a tqdm bar rewritten with \r, and a plain line from C (os.write on descriptor 2).
LIBRARY_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    from exporter.terminal import library_output
    kept = []
    with library_output(kept.append):
        warnings.warn_explicit("Mutation on a buffer in the KV cache", UserWarning, "lib.py", 7,
                               module_globals={"__name__": "lib"})
        print("x" * 3 + " a real message on stdout")
        os.write(2, b"[cpuinfo_utils.cpp:71] Failed to open midr file /sys/devices/...\\n")
        os.write(2, b"Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: nope\\n")
        warnings.warn_explicit("something the user must see", UserWarning, "lib.py", 9)
        sys.stderr.write("bar  10%\\rbar  50%\\rbar 100%\\n")
        os.write(2, b"a C++ error the user must see\\n")
    print("KEPT:" + repr(kept))
""")


def _run_library_script(*extra_env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    proc = subprocess.run([sys.executable, "-c", LIBRARY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("KEPT:"))
    return eval(line[5:]), proc  # noqa: S307 - our own repr of a list of str


def test_known_noise_is_dropped_and_real_output_kept():
    kept, proc = _run_library_script()
    text = "\n".join(kept)
    assert "xxx a real message on stdout" in kept
    assert "something the user must see" in text and "a C++ error the user must see" in kept
    assert "bar 100%" in kept and not any("10%" in k or "\r" in k for k in kept)  # one plain line per bar
    assert "Mutation on a buffer" not in text and "midr" not in text and "_C_mxfp8" not in text
    # the noise warning's source line goes with it; nothing leaked past the filter
    assert proc.stderr == "" and all(terminal.is_noise(k) is False for k in kept)


LIVE_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    from rich.console import Console
    from exporter.progress import task
    from exporter.terminal import Terminal
    screen = open(sys.argv[1], "w")
    term = Terminal(Console(file=screen, force_terminal=True, width=200))
    assert term.live
    with term.running(), task(term, "export: ONNX graph"):
        warnings.warn_explicit("Mutation on a buffer in the KV cache", UserWarning, "lib.py", 7,
                               module_globals={"__name__": "lib"})
        print("Please consider to run pre-processing before quantization.")
        os.write(2, b"[cpuinfo_utils.cpp:71] Failed to open midr file\\n")
        print("a real message on stdout")
        warnings.warn_explicit("something the user must see", UserWarning, "lib.py", 9)
    screen.close()
""")


def test_live_bars_do_not_let_python_output_past_the_filter(tmp_path):
    """With rich's live display on a terminal, Python's prints and warnings still go through the filter."""
    screen = tmp_path / "screen.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    proc = subprocess.run([sys.executable, "-c", LIVE_SCRIPT, str(screen)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    shown = screen.read_text()
    assert "a real message on stdout" in shown and "something the user must see" in shown
    assert "Mutation on a buffer" not in shown and "pre-processing" not in shown and "midr" not in shown
    assert proc.stdout == "" and proc.stderr == ""


def test_every_noise_pattern_matches_what_the_libraries_print():
    """The messages as the pinned libraries print them (copied from real runs) are each caught."""
    real = [
        "Failed to load /v/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not",
        "Failed to load /v/torchao/_C_cutlass_90a.abi3.so: Could not load this library",
        "W1202 04:50:01.520000 6251 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass and "
        "is now natively supported by torch.compile as an opaque value type.",
        "torchvision is not installed. Skipping torchvision::nms",
        "/v/torch/utils/_pytree.py:1: FutureWarning: isinstance(treespec, LeafSpec) is deprecated",
        "The axis name: batch will not be used, since it",
        "Please consider to run pre-processing before quantization. Refer to example: ...",
        "[cpuinfo_utils.cpp:71] Failed to open midr file /sys/devices/system/cpu/cpu0/regs/identification/midr_el1",
    ]
    assert all(terminal.is_noise(line) for line in real)
    assert not terminal.is_noise("RuntimeWarning: overflow encountered in matmul")
    assert not terminal.is_noise("Failed to load model.onnx: file is truncated")


def test_log_gets_plain_lines_heartbeats_and_estimates(tmp_path, monkeypatch):
    monkeypatch.setattr(terminal, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(terminal, "HEARTBEAT_POLL_S", 0.05)
    monkeypatch.setattr(terminal, "QUIET_S", 0.05)
    history_file = tmp_path / "timings.json"
    for run in range(2):
        buf = io.StringIO()
        term = terminal.Terminal(Console(file=buf, width=200), terminal.History(history_file, "m -> rpi onnx fp32"))
        assert not term.live
        with term.running():
            term("load: model")
            with task(term, "export: ONNX graph"):
                time.sleep(0.5)
            with task(term, "validate: parity windows", total=3) as counted:
                for _ in range(3):
                    time.sleep(0.06)
                    counted.advance()
        out = buf.getvalue()
        assert "\r" not in out and "\x1b" not in out  # a log gets no control codes
        assert "load: model" in out and re.search(r"done: export: ONNX graph in \d s", out)
        assert "... export: ONNX graph: 0 s so far" in out  # heartbeats while a library call runs
        assert "validate: parity windows: 1/3" in out or "validate: parity windows: 2/3" in out
        if run == 1:  # the second run knows how long the first took
            assert re.search(r"export: ONNX graph \(last run \d s\)", out)
            assert re.search(r"\(last run: \d s\)", out.split("... export")[1])  # the heartbeat compares with it
    assert history_file.exists()


def test_terminal_draws_bars_and_keeps_stage_lines():
    buf = io.StringIO()
    term = terminal.Terminal(Console(file=buf, force_terminal=True, width=120))
    assert term.live
    with term.running():
        with task(term, "validate: parity windows", total=2) as counted:
            counted.advance()
            time.sleep(0.3)
            counted.advance()
    out = buf.getvalue()
    assert "1/2" in out and "done: validate: parity windows" in out


def test_plain_callables_still_work_as_progress():
    seen = []
    with task(seen.append, "export: torch.export") as t:
        t.advance()
    assert seen == ["export: torch.export"]


def test_top_level_help_shows_the_headline_command_and_an_example_per_target():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    head = result.output.split("Commands:")[0]
    assert "slm-export --target TARGET" in head and "--out DIR" in head and "--model PATH" in head
    for target in TARGET_CHOICES:
        assert f"slm-export --target {target} --out {target}-bundle" in head


def _manifest(target="rpi", failures=(), device=None):
    return {"target": target, "format": "onnx", "recipe": "int8-dynamic",
            "model": {"num_parameters": 1_000_000},
            "artifact": {"bytes": 1_200_000, "files": ["model.onnx"]},
            "parity": {"passed": True, "failures": [], "metrics": {"top1_agreement": 0.9123, "ppl_rel_change": 0.021,
                                                                   "greedy_identical": False, "greedy_first_diff": 5}},
            "latency": {"latency": {"decode_tok_s": 41.5, "ttft_ms": 12.0, "peak_rss_mb": 300},
                        "device": {"hostname": "ci-box", "cpu": "AMD EPYC"}},
            "budget_failures": list(failures), "device": device}


def test_summary_says_size_verdict_latency_where_and_budget_misses(tmp_path):
    rows = dict(summary_rows(_manifest(failures=["decode 41.5 tok/s < 50"]), tmp_path / "b", 75))
    assert rows["artifact"].startswith("1.2 MB, 0.30x the 4.0 MB of fp32 weights")
    assert rows["parity"] == "passed: top-1 0.912, perplexity +2.1%, greedy differs from token 5"
    assert "41.5 tok/s decode" in rows["latency"] and "not on the rpi device" in rows["latency"]
    assert "ci-box" in rows["latency"]
    assert rows["budgets"].startswith("missed on this machine") and "decode 41.5 tok/s < 50" in rows["budgets"]
    assert rows["took"] == "1 min 15 s" and "report.html" in rows["bundle"]
    host = dict(summary_rows(_manifest(target="host"), tmp_path / "b", 5))
    assert "on this machine" in host["latency"] and "not on" not in host["latency"]
    assert host["budgets"] == "all met"
