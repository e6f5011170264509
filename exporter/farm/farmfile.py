"""The farm file: a TOML list of devices, parsed and validated with errors that name line and field.

Every mistake is a FarmFileError of the form ``FARM.toml:LINE: device 'pi': ...`` with a hint, so a
typo costs a second, not a farm run. Secrets are refused outright: a farm file names key files and
ssh_config hosts, never a password or a key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import SlmExportError

SECRET_FIELDS = {"password", "passphrase", "private_key", "secret", "token", "key", "ssh_password",
                 "sudo_password", "identity", "private_key_data"}
TRANSPORTS = ("local", "ssh", "emulated")  # emulated: an ARM64 board under QEMU (exporter/emulate.py)


@dataclass
class Device:
    """One device of a farm file (defaults already merged)."""

    name: str
    target: str
    transport: str = "ssh"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    ssh_alias: str | None = None  # a Host of the user's ssh_config instead of host/port/user
    identity_file: str | None = None  # path to a private key (never the key itself)
    known_hosts: str | None = None
    first_contact: bool = False  # StrictHostKeyChecking=accept-new: trust an UNKNOWN key once
    ssh_config: str | None = None
    python: str = "python3"
    workdir: str = "slm-export-farm"  # relative to the login home, or absolute
    threads: int | None = None
    decode_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    connect_timeout_s: float = 10.0
    timeout_s: float = 1800.0  # the run step's deadline (enforced on the device and here)
    probe_timeout_s: float = 120.0
    copy_timeout_s: float = 1800.0
    retries: int = 2
    budgets: dict = field(default_factory=dict)  # overrides of the target's Budgets fields
    providers: list | None = None  # ONNX Runtime providers; default: the target's
    trtexec: bool = True  # time the .onnx with trtexec when the target asks and the device has it
    board: str | None = None  # transport "emulated": pi4 | pi5 | android-arm64 (slm-export device emulate)
    line: int = 0  # where the device starts in the farm file


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Device) if f.name != "line"}
NUMBER_FIELDS = {"connect_timeout_s", "timeout_s", "probe_timeout_s", "copy_timeout_s"}
INT_FIELDS = {"port", "threads", "decode_tokens", "repeats", "warmup", "retries"}
BOOL_FIELDS = {"first_contact", "trtexec"}
PATH_FIELDS = {"identity_file", "known_hosts", "ssh_config"}
POSITIVE = {"decode_tokens", "repeats", "connect_timeout_s", "timeout_s", "probe_timeout_s", "copy_timeout_s"}


@dataclass
class Farm:
    """A parsed farm file: where it is and its devices, in file order."""

    path: Path
    devices: list[Device]


class FarmFileError(SlmExportError):
    """The farm file is not valid; the message names the file, line and field."""


def _key_line(lines: list[str], block: tuple[str, int] | None, key: str) -> int:
    """1-based line of ``key = ...`` inside table ``block`` ("device", index) or ("defaults", 0).

    tomllib reports no positions for keys, so the file text is scanned: table headers delimit the
    blocks; subtables such as ``[device.budgets]`` belong to the block above them.
    """
    current, index, start = None, -1, 0
    key_re = re.compile(rf'^\s*("{re.escape(key)}"|\'{re.escape(key)}\'|{re.escape(key)})\s*=')
    inline_re = re.compile(rf'[{{,]\s*{re.escape(key)}\s*=')
    header_re = re.compile(rf'^\s*\[+\s*[^\]]*\.{re.escape(key)}\s*\]+')
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0] if '"' not in raw and "'" not in raw else raw
        stripped = line.strip()
        if stripped.startswith("[[device]]"):
            current, index, start = "device", index + 1, n
        elif stripped.startswith("[defaults]"):
            current, start = "defaults", n
        elif stripped.startswith("[") and not stripped.startswith("[device.") and not stripped.startswith("[defaults."):
            current = stripped
        if block is None or (current == block[0] and (block[0] != "device" or index == block[1])):
            if key_re.match(line) or inline_re.search(line) or header_re.match(line):
                return n
    if block and block[0] == "device":
        return _device_start(lines, block[1])
    return start or 1


def _device_start(lines: list[str], index: int) -> int:
    seen = -1
    for n, raw in enumerate(lines, 1):
        if raw.strip().startswith("[[device]]"):
            seen += 1
            if seen == index:
                return n
    return 1


def load_farm(path: str | Path) -> Farm:
    """Parse and validate a farm file; any mistake is a FarmFileError naming line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FarmFileError(f"cannot read farm file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FarmFileError(f"{path}: not valid TOML: {e}", hint="see https://toml.io for the syntax") from None
    lines = text.splitlines()

    def fail(block, key, message, hint=None):
        raise FarmFileError(f"{path}:{_key_line(lines, block, key)}: {message}", hint=hint)

    _check_top_level(data, fail)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        fail(None, "defaults", "[defaults] must be a table")
    _check_fields(defaults, ("defaults", 0), fail, path, where="[defaults]", allow_name=False)
    raw_devices = data.get("device", [])
    if not isinstance(raw_devices, list) or not raw_devices:
        raise FarmFileError(f"{path}: no [[device]] entries", hint="add at least one [[device]] table with name and target")
    devices, names = [], set()
    for i, raw in enumerate(raw_devices):
        block = ("device", i)
        _check_fields(raw, block, fail, path, where=f"device #{i + 1}")
        merged = {**defaults, **raw}
        for req in ("name", "target"):
            if req not in merged:
                fail(block, "name", f"device #{i + 1} has no {req!r}")
        name = merged["name"]
        if name in names:
            fail(block, "name", f"device name {name!r} is used twice")
        names.add(name)
        devices.append(_make_device(merged, block, fail, path.parent, lines))
    return Farm(path=path, devices=devices)


def _check_top_level(data: dict, fail) -> None:
    for key in data:
        if key not in ("defaults", "device"):
            close = difflib.get_close_matches(key, ["defaults", "device"], n=1)
            fail(None, key, f"unknown top-level field {key!r}",
                 hint=f"did you mean {close[0]!r}?" if close else "a farm file has [defaults] and [[device]] tables")


def _check_fields(table: dict, block, fail, path: Path, where: str, allow_name: bool = True) -> None:
    """Reject unknown fields (with a suggestion), inline secrets, and values of the wrong type."""
    for key, value in table.items():
        if key.lower() in SECRET_FIELDS:
            fail(block, key, f"{where}: field {key!r} would put a secret in the farm file; secrets are not accepted",
                 hint="reference a key instead: identity_file = \"~/.ssh/id_ed25519_farm\" (load passphrase-"
                      "protected keys into ssh-agent), or ssh_alias = a Host of your ~/.ssh/config")
        if isinstance(value, str) and "PRIVATE KEY-----" in value:
            fail(block, key, f"{where}: field {key!r} holds an inline private key; secrets are not accepted",
                 hint="save the key in a file readable only by you and give its path as identity_file")
        if key not in FIELD_TYPES or (key == "name" and not allow_name):
            close = difflib.get_close_matches(key, list(FIELD_TYPES), n=1)
            fail(block, key, f"{where}: unknown field {key!r}",
                 hint=f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(FIELD_TYPES))}")
        _check_type(key, value, block, fail, where)


def _type_problem(key: str, value) -> str | None:
    """What ``value`` should have been for field ``key`` (None when its type is right)."""
    if key in BOOL_FIELDS and not isinstance(value, bool):
        return "true or false"
    if key in INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
        return "an integer"
    if key in NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "a number (seconds)"
    if key == "budgets" and not isinstance(value, dict):
        return "a table such as { decode_tok_s_min = 10 }"
    if key == "providers" and not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
        return "a list of ONNX Runtime provider names"
    if key not in BOOL_FIELDS | INT_FIELDS | NUMBER_FIELDS | {"budgets", "providers"} and not isinstance(value, str):
        return "a string"
    return None


def _check_type(key, value, block, fail, where) -> None:
    bad = _type_problem(key, value)
    if bad:
        fail(block, key, f"{where}: {key} must be {bad} (got {value!r})")
    if key in POSITIVE and value <= 0:
        fail(block, key, f"{where}: {key} must be > 0 (got {value!r})")
    if key in ("port",) and not 0 < value < 65536:
        fail(block, key, f"{where}: port must be 1..65535 (got {value})")
    if key in ("retries", "warmup", "threads") and value < 0:
        fail(block, key, f"{where}: {key} must be >= 0 (got {value})")


def _make_device(merged: dict, block, fail, base: Path, lines: list[str]) -> Device:
    """The Device of one merged [[device]] table, after the checks that need more than one field."""
    where = f"device {merged['name']!r}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", merged["name"]):
        fail(block, "name", f"{where}: names may hold letters, digits, '.', '_', '-'")
    _check_target(merged, block, fail, where)
    _check_transport(merged, block, fail, where)
    _check_budgets(merged, block, fail, where)
    values = {k: v for k, v in merged.items() if k in FIELD_TYPES}
    _resolve_paths(values, block, fail, where, base)
    _check_device_paths(values, block, fail, where)
    return Device(line=_device_start(lines, block[1]), **values)


def _check_target(merged: dict, block, fail, where: str) -> None:
    from targets import TARGETS

    if merged["target"] not in TARGETS.names():
        close = difflib.get_close_matches(merged["target"], TARGETS.names(), n=1)
        fail(block, "target", f"{where}: unknown target {merged['target']!r}",
             hint=(f"did you mean {close[0]!r}? " if close else "") + f"targets: {', '.join(TARGETS.names())}")


def _check_transport(merged: dict, block, fail, where: str) -> None:
    transport = merged.get("transport", "ssh")
    if transport not in TRANSPORTS:
        fail(block, "transport", f"{where}: transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})",
             hint="adb devices are measured with `slm-export android ...`, not the farm")
    if transport == "ssh" and bool(merged.get("host")) == bool(merged.get("ssh_alias")):
        fail(block, "host", f"{where}: an ssh device needs exactly one of host or ssh_alias")
    if transport == "emulated":
        _check_emulated(merged, block, fail, where)


def _check_emulated(merged: dict, block, fail, where: str) -> None:
    from ..emulate import BOARDS

    if merged.get("board") not in BOARDS:
        fail(block, "board" if "board" in merged else "transport",
             f"{where}: an emulated device needs board = one of {', '.join(BOARDS)} (got {merged.get('board')!r})",
             hint="build it first: slm-export device emulate pi5")
    # The board's own aarch64 Python runs the bundle; a host Python there would run x86 kernels.
    if merged.get("python", "python3") not in ("python3", "python"):
        fail(block, "python", f"{where}: an emulated device runs the board's own aarch64 Python; remove python")


def _check_budgets(merged: dict, block, fail, where: str) -> None:
    from targets import Budgets

    known = [f.name for f in dataclasses.fields(Budgets)]
    unknown = set(merged.get("budgets", {})) - set(known)
    if unknown:
        k = sorted(unknown)[0]
        fail(block, k, f"{where}: unknown budget {k!r}", hint=f"budgets: {', '.join(known)}")


def _resolve_paths(values: dict, block, fail, where: str, base: Path) -> None:
    """Make the local path fields absolute (relative ones are relative to the farm file) and check them."""
    for key in PATH_FIELDS & set(values):
        p = Path(values[key]).expanduser()
        p = p if p.is_absolute() else (base / p)
        if key != "known_hosts" and not p.exists():
            fail(block, key, f"{where}: {key} {str(p)!r} does not exist")
        if key == "identity_file" and p.suffix == ".pub":
            fail(block, key, f"{where}: identity_file must be the private key, not {p.name}")
        values[key] = str(p)


def _check_device_paths(values: dict, block, fail, where: str) -> None:
    """Paths that end up in an ssh option or a device command must be plain."""
    from targets.transports import SAFE_PATH

    if '"' in values.get("known_hosts", "") or "\n" in values.get("known_hosts", ""):
        fail(block, "known_hosts", f"{where}: known_hosts {values['known_hosts']!r} holds a double quote or a line "
                                   "break, which ssh cannot read in an option",
             hint="move the file to a folder whose name has no '\"'")
    if not SAFE_PATH.match(values.get("workdir", "slm-export-farm")) or ".." in PurePosixPath(
            values.get("workdir", "x")).parts:
        fail(block, "workdir", f"{where}: workdir {values.get('workdir')!r} must be a plain path "
                               "(letters, digits, '.', '_', '-', '/'; not starting with '-')")
