"""Emulated ARM64 boards: an aarch64 user-space run under ``qemu-aarch64-static``, as farm devices.

    slm-export device emulate pi4|pi5|android-arm64     build (once) and show what was installed
    slm-export device emulate --clean                   remove everything this module installed

Quantized kernels differ between x86 and ARM (NEON, dot-product, i8mm, XNNPACK's ARM paths); an
emulated board runs the real aarch64 builds of onnxruntime and ai-edge-litert on an emulated CPU
of the board's model, so parity is checked on ARM kernels without the hardware. Latency under
emulation is NOT device latency (the farm skips budgets and marks the row).

What the build puts in the cache (``$SLM_EXPORT_CACHE/emulated`` or ``~/.cache/slm-export/emulated``):

* ``rootfs/``: Debian bookworm arm64 packages for ``python3`` (and libstdc++6, which the wheels
  need), fetched by apt with a PRIVATE configuration (its own sources list, package lists, status
  file and download cache under ``apt/``; ``APT::Architecture=arm64``), unpacked with
  ``dpkg-deb -x``. Nothing is installed on the host: the host's dpkg database and architecture
  list are not touched, and no root is needed for this step;
* aarch64 wheels of numpy, onnxruntime and ai-edge-litert (``pip download --platform
  manylinux_*_aarch64 --only-binary=:all:``, the host's versions when it has them) unpacked into
  the rootfs's ``dist-packages``;
* ``boards/<board>/``: the rootfs seen through symlinks plus the board's own ``proc/cpuinfo``
  (onnxruntime's cpuinfo crashes at import under QEMU without an ARM-looking one; ``-L``
  redirects absolute paths into the prefix when the file exists there).

The only thing that needs root is Debian's ``qemu-user-static`` (``apt-get install
qemu-user-static``: the static ``/usr/bin/qemu-*-static`` binaries and binfmt_misc entries; the
farm calls ``qemu-aarch64-static`` explicitly and needs no binfmt registration).

ExecuTorch .pte bundles are not run under emulation: its Python runtime needs torch, and the
aarch64 torch wheel on PyPI is a CUDA (SBSA) build of several GB with NVIDIA libraries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import DeviceError, SlmExportError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEB_PACKAGES = ("python3", "libstdc++6")  # the wheels' C++ code needs libstdc++ / libgcc_s
WHEELS = ("numpy", "onnxruntime", "ai-edge-litert")
# Wheels of these projects carry manylinux_2_27/2_28 tags; list every tag Debian 12's glibc 2.36 accepts.
PLATFORMS = [f"manylinux_2_{v}_aarch64" for v in range(36, 16, -1)] + ["manylinux2014_aarch64"]
QEMU = "qemu-aarch64-static"
QEMU_HINT = ("apt-get install qemu-user-static (as root; installs Debian's static user-mode emulators "
             "/usr/bin/qemu-*-static and their binfmt_misc entries; the farm calls qemu-aarch64-static directly)")
EMULATED_NOTE = "emulated: latency is not device latency"
PTE_NOTE = ("ExecuTorch .pte is not run under emulation: its Python runtime needs torch, and the aarch64 torch "
            "wheel on PyPI is a CUDA (SBSA) build of several GB")
# Environment of the host Python that must not leak into the aarch64 Python.
HOST_PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "PYTHONEXECUTABLE")


@dataclass(frozen=True)
class Board:
    """An emulated board: the QEMU CPU model and what its /proc/cpuinfo says."""

    name: str
    target: str  # the slm-export target whose bundles it runs
    cpu: str  # qemu -cpu value
    description: str
    cpu_part: str  # MIDR part number in /proc/cpuinfo
    cpu_variant: str  # MIDR variant / revision, as the real board reports them
    cpu_revision: str
    features: str  # /proc/cpuinfo "Features" (the real board's; QEMU's HWCAPs decide the kernels)
    model: str  # /proc/cpuinfo "Model" / "Hardware" line


BOARDS = {b.name: b for b in (
    Board("pi4", "rpi", "cortex-a72", "Raspberry Pi 4 (Cortex-A72, Armv8.0: NEON, no dot-product)",
          "0xd08", "0x0", "3", "fp asimd evtstrm crc32 cpuid", "Raspberry Pi 4 Model B Rev 1.4"),
    Board("pi5", "rpi", "cortex-a76", "Raspberry Pi 5 (Cortex-A76, Armv8.2: NEON + dot-product)",
          "0xd0b", "0x4", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
          "Raspberry Pi 5 Model B Rev 1.0"),
    # QEMU 7.2 models no Cortex-A7xx/X core; "max" is an Armv9-class CPU (SVE2, i8mm, bf16, dot-product)
    # like a recent phone's. SME is switched off: with it, XNNPACK int8 results under QEMU 7.2 were
    # garbage (max logit error 15 on a tiny model) while every other CPU model agreed with x86.
    Board("android-arm64", "android", "max,sme=off",
          "Armv9-class phone CPU (QEMU 'max' without SME: SVE2, i8mm, bf16, dot-product); Debian user-space, not Android",
          "0xd47", "0x0", "0", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
                   "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp "
                   "sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svebf16 i8mm bf16 dgh bti",
          "Qualcomm Technologies, Inc (emulated)"),
)}


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where emulated boards live: ``<cache>/emulated`` ($SLM_EXPORT_CACHE or ~/.cache/slm-export)."""
    from .loading import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "emulated"


def get_board(name: str) -> Board:
    """The board called ``name`` or a SlmExportError listing the known ones."""
    if name not in BOARDS:
        raise SlmExportError(f"unknown emulated board {name!r}", hint=f"boards: {', '.join(BOARDS)}")
    return BOARDS[name]


def qemu_binary() -> str:
    """The path of qemu-aarch64-static, or a DeviceError saying how to install it."""
    found = shutil.which(QEMU)
    if not found:
        raise DeviceError(f"{QEMU} is not installed", hint=QEMU_HINT)
    return found


# ---------------------------------------------------------------- building the rootfs


def _host_versions() -> dict[str, str | None]:
    """The host's versions of the wheels (so host and emulated rows differ in kernels, not releases)."""
    out = {}
    for name in WHEELS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _requirements(versions: dict[str, str | None]) -> list[str]:
    return [f"{n}=={v}" if v else n for n, v in versions.items()]


def build_key(versions: dict[str, str | None]) -> str:
    """What the cached rootfs was built from: a different key means build again."""
    text = json.dumps({"suite": SUITE, "debs": DEB_PACKAGES, "wheels": _requirements(versions), "layout": 1})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run(cmd: list[str], what: str, timeout: float = 900) -> str:
    """Run a host tool (argument list); a failure is a SlmExportError quoting its last lines."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlmExportError(f"{what}: {cmd[0]} is not installed",
                             hint="building an emulated board needs a Debian/Ubuntu host (apt-get, dpkg-deb) and pip") from None
    except subprocess.TimeoutExpired:
        raise SlmExportError(f"{what} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = "\n".join([ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-5:])
        raise SlmExportError(f"{what} failed (exit {proc.returncode}): {tail}",
                             hint="the Debian archive and PyPI must be reachable")
    return proc.stdout


def apt_options(apt_dir: Path) -> list[str]:
    """apt-get options that confine apt to ``apt_dir`` and the arm64 architecture (host untouched)."""
    opts = {
        "Dir::State": apt_dir / "state", "Dir::State::status": apt_dir / "state" / "status",
        "Dir::Cache": apt_dir / "cache", "Dir::Etc::SourceList": apt_dir / "sources.list",
        "Dir::Etc::SourceParts": apt_dir / "sources.list.d", "Dir::Etc::Preferences": apt_dir / "preferences",
        "Dir::Etc::PreferencesParts": apt_dir / "preferences.d", "Dir::Etc::Parts": apt_dir / "apt.conf.d",
        "APT::Architecture": "arm64", "APT::Architectures::": "arm64", "Acquire::Languages": "none",
        "APT::Install-Recommends": "false", "Debug::NoLocking": "1",
    }
    if os.geteuid() == 0:  # root apt would drop to the _apt user, which cannot write our private folders
        opts["APT::Sandbox::User"] = "root"
    return [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]


def fetch_debs(apt_dir: Path, progress=lambda m: None) -> list[Path]:
    """Download python3 for arm64 and its dependency closure with a private apt; return the .deb files."""
    for sub in ("state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d", "apt.conf.d"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    if not Path(KEYRING).exists():
        raise SlmExportError(f"{KEYRING} is missing: apt cannot verify Debian's arm64 packages",
                             hint="apt-get install debian-archive-keyring")
    (apt_dir / "state" / "status").write_text("")  # an empty dpkg status: resolve the whole closure
    for old in (apt_dir / "cache" / "archives").glob("*.deb"):  # a previous build's versions must not be unpacked
        old.unlink()
    signed = f"[arch=arm64 signed-by={KEYRING}]"
    (apt_dir / "sources.list").write_text(f"deb {signed} {MIRROR} {SUITE} main\n"
                                          f"deb {signed} {SECURITY} {SUITE}-security main\n")
    opts = apt_options(apt_dir)
    progress(f"apt-get update (arm64, private lists in {apt_dir})")
    _run(["apt-get", *opts, "update"], "apt-get update for arm64")
    progress(f"apt-get install --download-only {' '.join(DEB_PACKAGES)} (arm64)")
    _run(["apt-get", *opts, "install", "--download-only", "-y", "-q", *DEB_PACKAGES], "downloading arm64 python3")
    debs = sorted((apt_dir / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise SlmExportError("apt downloaded no arm64 packages", hint=f"see {apt_dir}")
    return debs


def unpack_debs(debs: list[Path], rootfs: Path) -> None:
    """Unpack each .deb's files into ``rootfs`` (no maintainer scripts run, nothing is registered)."""
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(rootfs)], f"unpacking {deb.name}")


def python_version(rootfs: Path) -> str:
    """The X.Y of the Debian arm64 Python unpacked in ``rootfs``."""
    found = sorted(p.name for p in (rootfs / "usr" / "bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
    if not found:
        raise SlmExportError(f"no python3.X in {rootfs}/usr/bin after unpacking", hint="run the build again with --rebuild")
    return found[-1].removeprefix("python")


def fetch_wheels(dest: Path, py: str, requirements: list[str], progress=lambda m: None) -> list[Path]:
    """``pip download`` the aarch64 wheels (and their dependencies) for Python ``py``."""
    dest.mkdir(parents=True, exist_ok=True)
    progress(f"pip download {' '.join(requirements)} (aarch64, Python {py})")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(dest),
           "--only-binary=:all:", "--implementation", "cp", "--python-version", py,
           *[x for p in PLATFORMS for x in ("--platform", p)], *requirements]
    _run(cmd, "downloading the aarch64 wheels", timeout=1800)
    return sorted(dest.glob("*.whl"))


def install_wheels(wheels: list[Path], site: Path) -> None:
    """Unpack wheels into ``site`` (a wheel is a zip of its site-packages tree)."""
    site.mkdir(parents=True, exist_ok=True)
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)


def cpuinfo_text(board: Board, cpus: int) -> str:
    """An ARM /proc/cpuinfo for ``board`` with ``cpus`` processors (the host's: QEMU threads are host threads)."""
    block = (f"BogoMIPS\t: 108.00\nFeatures\t: {board.features}\nCPU implementer\t: 0x41\n"
             f"CPU architecture: 8\nCPU variant\t: {board.cpu_variant}\nCPU part\t: {board.cpu_part}\n"
             f"CPU revision\t: {board.cpu_revision}\n\n")
    body = "".join(f"processor\t: {i}\n{block}" for i in range(cpus))
    key = "Model" if board.name.startswith("pi") else "Hardware"
    return body + f"Revision\t: 0000\nSerial\t\t: 0000000000000000\n{key}\t\t: {board.model}\n"


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class BuildResult:
    """What ``ensure_board`` did and where things are."""

    board: Board
    root: Path  # <cache>/emulated
    prefix: Path  # the board's -L prefix
    python: str  # the aarch64 python inside the prefix
    built: bool  # False: reused from the cache
    seconds: float
    info: dict  # the rootfs stamp: versions, packages, sizes, build time

    def argv(self) -> list[str]:
        """The host command that runs the board's Python under QEMU (append the Python arguments)."""
        return [qemu_binary(), "-cpu", self.board.cpu, "-L", str(self.prefix), f"{self.prefix}{self.python}"]


def _stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / "rootfs" / ".slm-emulated.json").read_text())
    except (OSError, ValueError):
        return None


def build_rootfs(root: Path, versions: dict, progress=lambda m: None) -> dict:
    """Build ``root/rootfs`` (Debian arm64 python3 + aarch64 wheels) atomically; return its stamp."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"rootfs.partial-{uuid.uuid4().hex[:8]}"
    try:
        debs = fetch_debs(root / "apt", progress)
        progress(f"dpkg-deb -x {len(debs)} packages -> {partial.name}")
        unpack_debs(debs, partial)
        py = python_version(partial)
        wheels = fetch_wheels(root / "wheels" / build_key(versions), py, _requirements(versions), progress)
        progress(f"unpack {len(wheels)} wheels -> usr/lib/python3/dist-packages")
        install_wheels(wheels, partial / "usr" / "lib" / "python3" / "dist-packages")
        stamp = {"key": build_key(versions), "suite": SUITE, "python": py, "python_bin": f"/usr/bin/python{py}",
                 "debs": [d.name for d in debs], "wheels": [w.name for w in wheels],
                 "bytes": _tree_bytes(partial), "build_s": round(time.perf_counter() - t0, 1),
                 "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (partial / ".slm-emulated.json").write_text(json.dumps(stamp, indent=2))
        old = root / "rootfs"
        if old.exists():
            shutil.rmtree(old)
        partial.rename(old)
        return stamp
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def make_board_prefix(root: Path, board: Board) -> Path:
    """``root/boards/<board>``: symlinks to the shared rootfs plus the board's own proc/cpuinfo."""
    prefix = root / "boards" / board.name
    rootfs = root / "rootfs"
    prefix.mkdir(parents=True, exist_ok=True)
    for entry in rootfs.iterdir():
        if entry.name.startswith(".") or entry.name == "proc":
            continue
        link = prefix / entry.name
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link)
            try:
                link.symlink_to(entry)
            except FileExistsError:  # two farm devices on the same board set it up at once
                pass
    (prefix / "proc").mkdir(exist_ok=True)
    cpus = os.cpu_count() or 1
    text = cpuinfo_text(board, cpus)
    cpuinfo = prefix / "proc" / "cpuinfo"
    if not cpuinfo.exists() or cpuinfo.read_text() != text:
        cpuinfo.write_text(text)
    return prefix


def ensure_board(name: str, cache_dir: Path | None = None, rebuild: bool = False,
                 progress=lambda m: None) -> BuildResult:
    """Build the shared aarch64 rootfs unless a matching one is cached, then the board's prefix."""
    board = get_board(name)
    qemu_binary()  # fail early with the install hint: a rootfs without QEMU is of no use
    root = cache_root(cache_dir)
    versions = _host_versions()
    t0 = time.perf_counter()
    stamp = _stamp(root)
    built = rebuild or not stamp or stamp.get("key") != build_key(versions)
    if built:
        stamp = build_rootfs(root, versions, progress)
    prefix = make_board_prefix(root, board)
    return BuildResult(board, root, prefix, stamp["python_bin"], built, time.perf_counter() - t0, stamp)


def load_board(name: str, cache_dir: Path | None = None) -> BuildResult:
    """The already built board (for the farm); a DeviceError saying how to build it otherwise."""
    board = get_board(name)
    root = cache_root(cache_dir)
    stamp = _stamp(root)
    if not stamp:
        raise DeviceError(f"emulated board {name!r} is not built (nothing in {root})",
                          hint=f"slm-export device emulate {name}   (downloads ~70 MB, no root; needs {QEMU})")
    qemu_binary()
    return BuildResult(board, root, make_board_prefix(root, board), stamp["python_bin"], False, 0.0, stamp)


def clean(cache_dir: Path | None = None) -> tuple[Path, int]:
    """Remove every emulated board, the rootfs, the private apt state and the wheels; return (folder, bytes)."""
    root = cache_root(cache_dir)
    if not root.exists():
        return root, 0
    size = _tree_bytes(root)
    shutil.rmtree(root)
    return root, size


def device_env(base: dict | None = None) -> dict:
    """The environment for the emulated Python: the host's, less what points at the host's Python."""
    env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in HOST_PYTHON_ENV}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def transport(name: str, label: str | None = None, cache_dir: Path | None = None):
    """The farm transport for emulated board ``name`` (runs the device Python under QEMU)."""
    from targets.transports import EmulatedTransport

    b = load_board(name, cache_dir)
    return EmulatedTransport(b.argv(), label or f"{name} under {QEMU} -cpu {b.board.cpu} ({EMULATED_NOTE})",
                             env=device_env())


SMOKE = ("import json, platform, numpy, onnxruntime, ai_edge_litert.interpreter as tfl; "
         "from importlib.metadata import version; "
         "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
         "'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__, "
         "'ai-edge-litert': version('ai-edge-litert')}))")


def smoke_test(result: BuildResult, timeout: float = 300) -> dict:
    """Start the board's Python under QEMU and import numpy, onnxruntime and LiteRT; return their versions."""
    try:
        proc = subprocess.run([*result.argv(), "-c", SMOKE], capture_output=True, text=True, timeout=timeout,
                              env=device_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"the emulated {result.board.name} Python did not start within {timeout:g} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-3:]
        raise DeviceError(f"the emulated {result.board.name} Python does not start its runtimes "
                          f"(exit {proc.returncode}): {' | '.join(tail) or 'no output'}",
                          hint="slm-export device emulate --rebuild " + result.board.name)
    return json.loads(lines[-1])


def farm_snippet(board: Board) -> str:
    """The [[device]] table that puts ``board`` in a farm file."""
    return (f'[[device]]\nname = "{board.name}-emulated"\ntarget = "{board.target}"\n'
            f'transport = "emulated"\nboard = "{board.name}"\n')


def cli_emulate(board: str | None, clean_all: bool, rebuild: bool, cache_dir: Path | None) -> None:
    """``slm-export device emulate``: build/reuse a board and say what is where, or remove everything."""
    import click

    class _Out:  # plain lines (no rich markup: the farm snippet holds [[device]])
        @staticmethod
        def print(text: str) -> None:
            click.echo(text)

    out = _Out()
    if clean_all:
        root, size = clean(cache_dir)
        out.print(f"removed {root} ({size / 1e6:.0f} MB)" if size else f"nothing to remove ({root} does not exist)")
        out.print(f"{QEMU} (Debian's qemu-user-static) stays installed; remove it as root with "
                  "`apt-get remove qemu-user-static` if nothing else needs it")
        return
    if not board:
        raise SlmExportError("name a board to build, or --clean", hint=f"boards: {', '.join(BOARDS)}")
    start = time.perf_counter()
    res = ensure_board(board, cache_dir, rebuild,
                       progress=lambda m: click.echo(f"{time.perf_counter() - start:7.1f}s {m}", err=True))
    smoke = smoke_test(res)
    info = res.info
    out.print(f"{res.board.name}: {res.board.description}")
    out.print(f"  {'built' if res.built else 'reused from the cache'} in {res.seconds:.1f} s "
              f"(the rootfs build took {info['build_s']} s on {info['built']})")
    out.print(f"  runs as: {' '.join(res.argv())}")
    out.print(f"  aarch64 Python {smoke['python']}: numpy {smoke['numpy']}, onnxruntime {smoke['onnxruntime']}, "
              f"ai-edge-litert {smoke['ai-edge-litert']} (machine {smoke['machine']})")
    out.print(f"  installed under {res.root} ({_tree_bytes(res.root) / 1e6:.0f} MB), nothing outside it:")
    out.print(f"    rootfs/      {len(info['debs'])} Debian {SUITE} arm64 packages unpacked with dpkg-deb -x "
              f"(host dpkg and its architecture list untouched) + {len(info['wheels'])} aarch64 wheels")
    out.print("    apt/         the private apt state (sources list, package lists, downloaded .debs)")
    out.print("    wheels/      the downloaded aarch64 wheels")
    out.print(f"    boards/{res.board.name}/  symlinks to rootfs/ + proc/cpuinfo of the board")
    out.print(f"  root was needed only for {QEMU}: {QEMU_HINT}")
    out.print("  remove everything: slm-export device emulate --clean")
    out.print(f"  latency under emulation is NOT device latency; {PTE_NOTE}.")
    out.print("\nadd it to a farm file:\n" + farm_snippet(res.board))
