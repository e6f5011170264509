"""The device side of the device farm: probe a device, verify a deployment, run a bundle with a deadline.

Standard library only at import time, and self-contained: the farm sends this file's source to the
device as ``python -c SOURCE COMMAND ...`` (so nothing has to be installed on the device before the
probe), and prints exactly one JSON line per command:

Any command may be preceded by ``--exit-on-stdin-eof``: the farm keeps this program's stdin open (a pipe it
never writes) for as long as it wants the command to run, so EOF on stdin means the farm is gone
(Ctrl-C, its ssh client killed, the connection dropped) and the command stops at once instead of
running on, unwatched, for up to its deadline.

    probe FORMAT [--trtexec CANDIDATE ...]       python, numpy, the format's runtime, ORT providers, trtexec
    verify DIR EXPECTED_JSON                     sha256 + size of every deployed file against EXPECTED_JSON
    run --support DIR --deadline S [--providers P1,P2] [--provider-options JSON] BUNDLE [--decode-tokens N]
        [--repeats R] [--warmup W] [--threads T] [--parity]
                                                 slm_runtime.main.run() from DIR, killed after S seconds

``run`` imports the device-side runtime (``exporter/runtime`` deployed as package ``slm_runtime`` in
DIR). When ``--providers`` is given it creates ONNX Runtime sessions with those execution providers
(the ones available on the device, in that order) and reports the providers each session really
used: onnxruntime silently falls back to the CPU when, say, CUDA is missing, and a farm must see that.
"""

import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import threading

# Python module(s) a format's runner imports -> the pip package that provides it (alternatives in order).
RUNTIME_MODULES = {
    "onnx": [("onnxruntime", "onnxruntime")],
    "tflite": [("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime")],
    "pte": [("executorch", "executorch")],
}
MIN_PYTHON = (3, 9)


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _import_version(module):
    """(version, None) when ``module`` imports, else (None, error text)."""
    try:
        mod = __import__(module)
    except Exception as e:  # ImportError, or a broken wheel failing at import time
        return None, f"{type(e).__name__}: {e}"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module.replace("_", "-"))
        except Exception:
            version = "unknown"
    return str(version), None


def probe(args):
    fmt = args[0] if args else "onnx"
    candidates = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--trtexec"]
    out = {
        "python": platform.python_version(),
        "python_ok": sys.version_info[:2] >= MIN_PYTHON,
        "executable": sys.executable,
        "machine": platform.machine(),
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
    }
    out["numpy"], out["numpy_error"] = _import_version("numpy")
    out["runtime"], out["runtime_version"], out["runtime_errors"] = None, None, {}
    for module, pip_name in RUNTIME_MODULES.get(fmt, []):
        version, error = _import_version(module)
        if version:
            out["runtime"], out["runtime_version"] = pip_name, version
            break
        out["runtime_errors"][pip_name] = error
    if out["runtime"] == "onnxruntime":
        import onnxruntime

        out["ort_providers"] = list(onnxruntime.get_available_providers())
    out["trtexec"] = None
    for cand in candidates:
        found = shutil.which(cand) or (cand if os.path.isfile(cand) and os.access(cand, os.X_OK) else None)
        if found:
            out["trtexec"] = found
            break
    emit(out)
    return 0


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_file(root, rel):
    """The path of ``rel`` under ``root`` if it is a plain relative path to a regular file, else a problem.

    (exporter/runtime/files.py holds the same rule for runners; this file must stay self-contained.)
    """
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
        return None, "a path that leaves the deployment folder"
    path = root
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except OSError:
            return None, "missing"
        if stat.S_ISLNK(st.st_mode):
            return None, "a symlink"
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None, "not inside a folder"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    return path, None


def verify(args):
    """Every expected file is a plain file with its size and sha256, and nothing else was deployed."""
    root, expected = args[0], json.loads(args[1])
    bad = []
    for rel, entry in sorted(expected.items()):
        path, problem = _plain_file(root, rel)
        if problem:
            bad.append({"file": rel, "problem": problem})
            continue
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            bad.append({"file": rel, "problem": f"{size} bytes, expected {entry['bytes']}"})
        elif _sha256(path) != entry["sha256"]:
            bad.append({"file": rel, "problem": "sha256 differs"})
    for folder, dirs, files in os.walk(root):  # (os.walk does not follow symlinked folders)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if rel not in expected and "__pycache__" not in rel.split("/"):
                bad.append({"file": rel, "problem": "not part of the deployment"})
    emit({"ok": not bad, "checked": len(expected), "bad": bad})
    return 0


def _option(args, name, default=None, cast=str):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i:i + 2]
        return cast(value)
    return default


def _flag(args, name):
    if name in args:
        args.remove(name)
        return True
    return False


def _start_watchdog(seconds):
    """Kill this process after ``seconds`` even inside a long native call (a stuck device run)."""
    import faulthandler

    def fire():
        emit({"error": f"the run exceeded its deadline of {seconds:g} s on the device and was stopped",
              "deadline_s": seconds})
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    # Backstop in C: fires even if the interpreter never gets the GIL back to run the timer.
    faulthandler.dump_traceback_later(seconds + 10, exit=True)


def _exit_on_stdin_eof():
    """Exit (code 130) as soon as stdin reaches EOF: whoever started this command has gone away."""

    def watch():
        try:
            while os.read(0, 4096):
                pass  # the farm never writes; anything that arrives is ignored
        except OSError:
            pass
        os._exit(130)

    threading.Thread(target=watch, daemon=True).start()


def use_ort_providers(requested, provider_options):
    """Make every onnxruntime session use ``requested`` providers (the available ones, in order).

    Returns the list that collects, per session, the providers onnxruntime actually enabled.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in requested if p in available] or ["CPUExecutionProvider"]
    options = [provider_options.get(p, {}) for p in chosen]
    used = []
    base = ort.InferenceSession

    class Session(base):
        def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None, **kw):
            super().__init__(path_or_bytes, sess_options, providers=chosen, provider_options=options, **kw)
            used.append(self.get_providers())

    ort.InferenceSession = Session
    return available, chosen, used


def run(args):
    args = list(args)
    support = _option(args, "--support")
    deadline = _option(args, "--deadline", 1800.0, float)
    providers = [p for p in (_option(args, "--providers", "") or "").split(",") if p]
    provider_options = json.loads(_option(args, "--provider-options", "{}"))
    decode_tokens = _option(args, "--decode-tokens", 64, int)
    repeats = _option(args, "--repeats", 3, int)
    warmup = _option(args, "--warmup", 1, int)
    threads = _option(args, "--threads", None, int)
    parity = _flag(args, "--parity")
    bundle = args[0]
    _start_watchdog(deadline)
    version, error = _import_version("numpy")
    if not version:
        emit({"error": f"numpy cannot be imported on the device ({error}): pip install numpy", "missing": "numpy"})
        return 2
    # Appended, not prepended: the deployment folder (which holds the bundle) must never shadow an
    # installed module; it only adds the runtime package under its own name.
    sys.path.append(support)
    from pathlib import Path

    from slm_runtime import main as rt_main
    from slm_runtime.base import RunnerError

    ort_info = None
    if providers:
        try:
            available, chosen, used = use_ort_providers(providers, provider_options)
            ort_info = {"requested": providers, "available": available, "chosen": chosen, "used": used}
        except ImportError as e:
            emit({"error": f"onnxruntime cannot be imported on the device ({e}): pip install onnxruntime",
                  "missing": "onnxruntime"})
            return 2
    try:
        result = rt_main.run(Path(bundle), decode_tokens, repeats, warmup, threads, parity)
    except RunnerError as e:
        emit({"error": str(e)})
        return 2
    except Exception as e:  # noqa: BLE001 - report any runtime failure as one JSON line
        emit({"error": f"{type(e).__name__}: {str(e).strip()[:500]}"})
        return 3
    if ort_info is not None:
        result["ort_providers"] = ort_info
    emit(result)
    return 0


def main(argv):
    commands = {"probe": probe, "verify": verify, "run": run}
    argv = list(argv)
    if argv[:1] == ["--exit-on-stdin-eof"]:
        del argv[0]
        _exit_on_stdin_eof()
    if not argv or argv[0] not in commands:
        emit({"error": f"usage: probe|verify|run ... (got {argv[:1]})"})
        return 64
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    # Under `python -c SOURCE a b`, sys.argv is ['-c', 'a', 'b'].
    sys.exit(main(sys.argv[1:]))
