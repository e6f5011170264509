"""How the device farm reaches a device: this machine (``local``) or the system OpenSSH client (``ssh``).

Both transports offer the same three operations, on argument lists only:

* ``run(argv, timeout)``: run a program on the device and return its exit code and output;
* ``copy_dir(local, remote)``: copy a folder (not atomic on its own);
* ``deploy(sources, dest, verify)``: the atomic deployment built on the two above. Every folder is
  copied into ``<dest>.partial-<random>``, checked by ``verify`` (the farm hashes every file on the
  device), and only then moved to ``dest`` with ``mv``. A copy cut short leaves at most the partial
  folder (removed when the device still answers), never a half-copied ``dest``, so a half-copied
  artifact is never run.

Remote paths are POSIX paths on the device; a relative one is relative to the login user's home
directory (ssh starts commands there; the local transport runs commands with ``cwd=$HOME`` to match).

The ssh transport checks host keys by default (``StrictHostKeyChecking=yes`` against the user's
known_hosts or a farm-given file), never asks for a password (``BatchMode=yes``), bounds the
connection (``ConnectTimeout``) and every step (a timeout that kills the local ssh process group),
and retries only *connection* failures, a bounded number of times. Host-key and authentication
failures are never retried: they need a person, and the error says what to check.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from exporter.errors import DeviceError

# Paths the farm creates or removes on a device: plain characters only, so a typo in a farm file
# cannot turn ``rm -rf`` or ``mv`` into something else. (They are quoted anyway.)
# The first character may not be '-': such a path would be read as an option by mkdir, rm or mv.
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+][A-Za-z0-9._/+@-]*$")

# The device-side shell snippet that moves a verified partial folder into place. "$1" is the
# destination, "$2" a name for the previous deployment while it is replaced, "$3" the partial folder.
# At no moment does the destination hold a mix of two deployments or a partial one.
MOVE_INTO_PLACE = 'if [ -e "$1" ]; then mv "$1" "$2"; fi; mv "$3" "$1" && rm -rf "$2"'

# ssh's own failures (exit code 255) that are about reaching the device, not about trust.
CONNECT_PATTERNS = (
    "connection refused", "connection timed out", "timed out during banner exchange", "no route to host",
    "network is unreachable", "connection closed by", "connection reset", "kex_exchange_identification",
    "could not resolve hostname", "name or service not known", "temporary failure in name resolution",
    "broken pipe", "closed by remote host", "operation timed out", "host is down", "lost connection",
)
# ssh's own words when an established connection dies: the device froze, lost power or the network
# went away mid-step (ServerAliveInterval x ServerAliveCountMax without an answer). Checked before
# CONNECT_PATTERNS ("client_loop: send disconnect: Broken pipe" also says "broken pipe").
LOST_PATTERNS = ("not responding", "client_loop: send disconnect", "packet_write_wait", "client_loop: ")
# How ssh's own error lines look (as opposed to the remote program's): exit 255 with one of these is
# ssh failing, not the device's program. Config errors start with the file name, hence the search.
SSH_OWN = re.compile(r"^(ssh: |ssh_|command-line line \d+:|command-line: |bad owner or permissions|"
                     r"no argument after keyword|load key |kex_|channel \d+: |percent_expand|hostkeys_|mux_|"
                     r"control_)|line \d+: (bad configuration option|unsupported option)|"
                     r"terminating, \d+ bad configuration options", re.I)
HOSTKEY_CHANGED = "remote host identification has changed"
HOSTKEY_FAILED = "host key verification failed"
AUTH_FAILED = ("permission denied", "too many authentication failures", "no more authentication methods")


class TransportError(DeviceError):
    """A step on a device failed; ``kind`` says why: connect | hostkey | auth | lost | ssh | timeout | command |
    copy | interrupted (``cancel()``: Ctrl-C)."""

    def __init__(self, message: str, hint: str | None = None, kind: str = "command"):
        super().__init__(message, hint)
        self.kind = kind

    @property
    def device_down(self) -> bool:
        """The device cannot be reached or trusted at all (as opposed to a step failing on it)."""
        return self.kind in ("connect", "hostkey", "auth", "lost", "ssh")


@dataclass
class Result:
    """What one program run on the device returned."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def last_json_line(self) -> str | None:
        """The last stdout line that looks like a JSON object (runners print one)."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        return lines[-1] if lines else None


# ---------------------------------------------------------------- cancellation
#
# Ctrl-C reaches only the main thread, while the device steps block in worker threads on child
# processes that live in their own sessions (so the terminal's SIGINT never reaches them). The main
# thread therefore calls ``cancel()``: it sets CANCELLED and kills every live process group; a worker
# blocked in ``_run_process`` then returns at once with an "interrupted" TransportError, and no new
# step starts, except cleanup steps (``cleanup_steps()``), which stay allowed with a short timeout.

CANCELLED = threading.Event()
CLEANUP_TIMEOUT_S = 10.0
_live: set = set()  # Popen objects of running steps
_live_lock = threading.Lock()
_local = threading.local()


def cancel() -> None:
    """Stop every running step now (kill each process group) and refuse new non-cleanup steps."""
    CANCELLED.set()
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        _kill_group(proc)


def reset_cancel() -> None:
    """Allow steps again (a new farm run in the same process)."""
    CANCELLED.clear()


@contextlib.contextmanager
def cleanup_steps():
    """Inside this block, steps still run after ``cancel()`` (removing partial folders), briefly."""
    _local.cleanup = True
    try:
        yield
    finally:
        _local.cleanup = False


def _interrupted(what: str) -> TransportError:
    return TransportError(f"{what or 'the step'} was interrupted (Ctrl-C)", kind="interrupted")


def _kill_group(proc: subprocess.Popen) -> None:
    # ssh (or a local runner) may have children; killing the group is the only way to make sure
    # nothing is left holding the terminal or the device connection.
    proc.slm_killed = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reader(stream, chunks: list) -> threading.Thread:
    t = threading.Thread(target=lambda: chunks.append(stream.read()), daemon=True)
    t.start()
    return t


def _run_process(cmd: list[str], timeout: float, cwd: str | None = None, env: Mapping[str, str] | None = None,
                 what: str = "") -> tuple[int, str, str, float]:
    """Run ``cmd`` (a list) in its own process group; on timeout or ``cancel()`` kill the whole group and raise.

    stdin is a pipe that is never written and stays open while the program runs: the device-side
    runner watches it, so when this ssh client dies (killed here), the remote stdin reaches EOF and
    the remote run stops too. (``communicate()`` would close stdin at once, hence the reader threads.)
    """
    cleanup = getattr(_local, "cleanup", False)
    if CANCELLED.is_set():
        if not cleanup:
            raise _interrupted(what)
        timeout = min(timeout, CLEANUP_TIMEOUT_S)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=cwd, env=dict(env) if env is not None else None,
                                start_new_session=True)
    except OSError as e:
        raise TransportError(f"cannot start {cmd[0]}: {e.strerror}", kind="command") from None
    proc.slm_killed = False
    with _live_lock:
        _live.add(proc)
    if CANCELLED.is_set() and not cleanup:  # cancel() ran between the check above and the registration
        _kill_group(proc)
    out, err = [], []
    readers = [_reader(proc.stdout, out), _reader(proc.stderr, err)]
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        timed_out = True
    finally:
        with _live_lock:
            _live.discard(proc)
    for r in readers:  # a killed group closes the pipes; a leftover grandchild must not hang us
        r.join(timeout=5 if (timed_out or proc.slm_killed) else None)
    with contextlib.suppress(OSError):
        proc.stdin.close()
    if proc.slm_killed and not timed_out:
        raise _interrupted(what)
    if timed_out:
        raise TransportError(f"{what or cmd[0]} did not finish within {timeout:g} s (stopped)",
                             hint="the device stopped answering or the step is slower than its timeout; "
                                  "raise the device's timeout in the farm file if it is just slow",
                             kind="timeout")
    return proc.returncode, "".join(out), "".join(err), time.perf_counter() - t0


def check_known_hosts_path(path: str) -> str:
    """Refuse a known_hosts path that ssh's option parser cannot take even quoted (a double quote in it)."""
    if '"' in str(path) or "\n" in str(path):
        raise DeviceError(f"known_hosts path {str(path)!r} holds a double quote or a line break, which ssh "
                          "cannot read in an option", hint="move the known_hosts file to a folder without '\"'")
    return path


def ssh_quote(value: str) -> str:
    """``value`` as ONE word for ssh's own ``-o`` parser.

    ssh splits an ``-o Key=value`` argument like a config line: a space separates words (for
    UserKnownHostsFile: several files), double quotes group, a backslash escapes '\\' and '"', and
    '%' starts a token (%d, %h...), so a path with a space or '%' would silently name other files.
    Double quotes themselves are refused by ``check_known_hosts_path``.
    """
    return '"' + value.replace("\\", "\\\\").replace("%", "%%") + '"'


def check_remote_path(path: str, what: str = "path") -> str:
    """Refuse device paths with characters that have no place in a deployment folder name."""
    if not path or not SAFE_PATH.match(path) or ".." in PurePosixPath(path).parts:
        raise DeviceError(f"{what} {path!r} is not a plain path",
                          hint="use letters, digits, '.', '_', '-', '/', not starting with '-' "
                               "(absolute, or relative to the home folder)")
    return path


@dataclass(frozen=True)
class Capabilities:
    """What the farm may conclude from runs over a transport; each transport class declares its own.

    The farm reads these instead of asking which transport it has, so a new transport (a Ray worker,
    a simulator) says what its figures are worth and the checks follow.
    """

    # Latency measured through this transport is the device's own: the target's budgets are judged on it.
    device_timings: bool = True
    timings_note: str = ""  # why budgets are skipped when device_timings is False
    note: str = ""  # said on a device's report row when all its checks pass (how to read its figures)
    refused_formats: Mapping[str, str] = field(default_factory=dict)  # format -> why it is not run here


class Transport:
    """A way to run programs on a device and copy folders to it."""

    name = ""
    label = ""
    capabilities = Capabilities()  # a real device: its timings are its own and every format runs

    def run(self, argv: list[str], timeout: float, env: Mapping[str, str] | None = None,
            what: str = "") -> Result:
        raise NotImplementedError

    def copy_dir(self, local: Path, remote: str, timeout: float) -> None:
        raise NotImplementedError

    def check_run(self, argv: list[str], timeout: float, what: str, env: Mapping[str, str] | None = None) -> Result:
        """``run`` that turns a non-zero exit into a TransportError quoting the output's last line."""
        res = self.run(argv, timeout, env=env, what=what)
        if res.returncode != 0:
            tail = [ln for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
            raise TransportError(f"{what} failed on {self.label} (exit {res.returncode}): "
                                 f"{tail[-1][:300] if tail else 'no output'}", kind="command")
        return res

    def deploy(self, sources: Mapping[str, Path], dest: str, verify: Callable[[str], None] | None = None,
               timeout: float = 600) -> str:
        """Copy each ``sources[name]`` folder to ``dest/name`` atomically; return ``dest``.

        ``verify(partial_dir)`` runs after the copy and before the move and raises if anything
        arrived damaged; the destination is claimed only after it returns.
        """
        check_remote_path(dest, "deployment folder")
        parent = str(PurePosixPath(dest).parent)
        partial = f"{dest}.partial-{uuid.uuid4().hex[:10]}"
        self.check_run(["mkdir", "-p", parent], 60, "creating the deployment folder")
        try:
            self.check_run(["mkdir", partial], 60, "creating the partial folder")
            for name, local in sources.items():
                self.copy_dir(Path(local), f"{partial}/{name}", timeout)
            if verify:
                verify(partial)
            self.check_run(["sh", "-c", MOVE_INTO_PLACE, "slm-move", dest, f"{dest}.old-{uuid.uuid4().hex[:6]}",
                            partial], 120, "moving the deployment into place")
        except DeviceError as e:
            with cleanup_steps():  # also after Ctrl-C: no partial folder is left on the device
                self._discard(partial)
            kind = getattr(e, "kind", "copy")
            raise TransportError(f"deploying to {self.label} failed; nothing was deployed to {dest}: {e.message}",
                                 hint=e.hint, kind=kind) from None
        return dest

    def _discard(self, partial: str) -> None:
        try:
            self.run(["rm", "-rf", partial], 60, what="removing the partial copy")
        except DeviceError:
            pass  # the device is gone; a partial folder is never run (only `dest` is)


class LocalTransport(Transport):
    """This machine: programs run as subprocesses, folders are copied with shutil."""

    name = "local"

    def __init__(self, label: str = "localhost"):
        self.label = label
        self.home = str(Path.home())

    def _path(self, remote: str) -> Path:
        p = Path(remote)
        return p if p.is_absolute() else Path(self.home) / p

    def run(self, argv: list[str], timeout: float, env: Mapping[str, str] | None = None, what: str = "") -> Result:
        """Run ``argv`` here with ``cwd`` = home (as ssh does on a device) and extra ``env`` entries."""
        full_env = {**os.environ, **(env or {})}
        code, out, err, secs = _run_process(list(map(str, argv)), timeout, cwd=self.home, env=full_env, what=what)
        return Result(list(argv), code, out, err, secs)

    def copy_dir(self, local: Path, remote: str, timeout: float) -> None:
        try:
            shutil.copytree(local, self._path(remote), ignore=shutil.ignore_patterns("__pycache__"))
        except OSError as e:
            raise TransportError(f"copying {local} to {remote} failed: {e}", kind="copy") from None


@dataclass
class SshOptions:
    """How to reach one device with OpenSSH; secrets are only ever referenced by path."""

    host: str  # an address, or a Host alias of the user's ssh_config
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None  # private key path; passphrase-protected keys need ssh-agent
    known_hosts: str | None = None  # a farm-given known_hosts file; default: the user's
    first_contact: bool = False  # accept an unknown host key once (accept-new), never a changed one
    ssh_config: str | None = None  # an ssh_config file (-F); default: ~/.ssh/config
    connect_timeout_s: float = 10
    retries: int = 2  # extra attempts after a connection failure
    retry_backoff_s: float = 1.0
    alive_interval_s: int = 5  # ServerAliveInterval: a device silent this long is asked if it is there
    alive_count_max: int = 3  # ServerAliveCountMax: unanswered asks before ssh gives the device up
    extra_options: dict = field(default_factory=dict)


class SshTransport(Transport):
    """A device reached with the system ``ssh`` and ``scp`` (SFTP protocol), argument lists only."""

    name = "ssh"

    def __init__(self, opts: SshOptions, ssh: str = "ssh", scp: str = "scp"):
        if opts.host.startswith("-") or (opts.user or "").startswith("-"):
            raise DeviceError(f"ssh host {opts.host!r} / user {opts.user!r} may not start with '-'")
        if opts.known_hosts:
            check_known_hosts_path(opts.known_hosts)
        self.opts = opts
        self.ssh = shutil.which(ssh) or ssh
        self.scp = shutil.which(scp) or scp
        if not shutil.which(self.ssh):
            raise TransportError("the OpenSSH client (ssh) is not installed",
                                 hint="apt-get install openssh-client", kind="connect")
        port = f":{opts.port}" if opts.port else ""
        self.label = f"{opts.user + '@' if opts.user else ''}{opts.host}{port}"

    # ------------------------------------------------------------ command lines

    def common_options(self) -> list[str]:
        """``-o`` options shared by ssh and scp: trust, no prompts, bounded connection."""
        o = self.opts
        check = "accept-new" if o.first_contact else "yes"  # accept-new: unknown keys once, changed keys never
        args = ["-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={check}",
                "-o", f"ConnectTimeout={max(1, int(round(o.connect_timeout_s)))}",
                "-o", f"ServerAliveInterval={o.alive_interval_s}", "-o", f"ServerAliveCountMax={o.alive_count_max}",
                # INFO, not ERROR: ssh says "Timeout, server X not responding." (a device that froze or
                # lost power mid-step) and "Connection to X closed by remote host." only at INFO;
                # without them an exit 255 would look like the device's program failing silently.
                "-o", "LogLevel=INFO"]
        if o.ssh_config:
            args = ["-F", str(Path(o.ssh_config).expanduser())] + args
        if o.known_hosts:
            args += ["-o", f"UserKnownHostsFile={ssh_quote(str(Path(o.known_hosts).expanduser()))}"]
        if o.identity_file:
            args += ["-i", str(Path(o.identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
        if o.user:
            args += ["-o", f"User={o.user}"]
        for key, value in o.extra_options.items():
            args += ["-o", f"{key}={value}"]
        return args

    def ssh_argv(self, argv: list[str]) -> list[str]:
        """The local ssh command running ``argv`` on the device.

        ssh sends ONE command string, which the device's login shell parses (``$SHELL -c``): that is
        how OpenSSH works and cannot be avoided. Each element is quoted with ``shlex.quote`` and
        joined with spaces, so a POSIX shell (sh, dash, bash, zsh) splits it back into exactly
        these arguments, with no expansion, globbing or command substitution; nothing from a
        farm file or bundle is ever interpreted as shell syntax. (A non-POSIX login shell such as
        fish is not supported.) ``--`` ends ssh's own options before the destination.
        """
        remote = " ".join(shlex.quote(str(a)) for a in argv)
        port = ["-p", str(self.opts.port)] if self.opts.port else []
        return [self.ssh, *self.common_options(), *port, "--", self.opts.host, remote]

    def scp_argv(self, local: Path, remote: str) -> list[str]:
        """The local scp command copying folder ``local`` to ``remote`` (SFTP protocol: no remote shell)."""
        port = ["-P", str(self.opts.port)] if self.opts.port else []
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return [self.scp, "-q", "-r", "-p", *self.common_options(), *port, "--", str(local), f"{host}:{remote}"]

    # ------------------------------------------------------------ operations

    def run(self, argv: list[str], timeout: float, env: Mapping[str, str] | None = None, what: str = "") -> Result:
        """Run ``argv`` on the device (``env`` entries are passed with ``env NAME=VALUE``), retrying
        connection failures up to ``retries`` times with a growing pause."""
        if env:
            argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
        cmd = self.ssh_argv(list(map(str, argv)))
        return self._with_retries(lambda: _run_process(cmd, timeout, what=what or "ssh"), argv, what)

    def copy_dir(self, local: Path, remote: str, timeout: float) -> None:
        cmd = self.scp_argv(Path(local), remote)
        res = self._with_retries(lambda: _run_process(cmd, timeout, what=f"copying {Path(local).name}"),
                                 cmd, f"copying {Path(local).name}")
        if res.returncode != 0:
            detail = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
            hint = None
            if "subsystem request failed" in res.stderr.lower():
                hint = "enable SFTP on the device: `Subsystem sftp /usr/lib/openssh/sftp-server` in /etc/ssh/sshd_config"
            raise TransportError(f"copying {local} to {self.label}:{remote} failed: {detail}", hint=hint, kind="copy")

    def _with_retries(self, attempt: Callable[[], tuple], argv: list[str], what: str) -> Result:
        o = self.opts
        first = None
        for i in range(o.retries + 1):
            code, out, err, secs = attempt()
            if code != 255:
                return Result(list(argv), code, out, err, secs)
            failure = self.classify(err)
            if failure.kind != "connect" or i == o.retries:
                if failure.kind == "command":  # 255 from the remote program itself
                    return Result(list(argv), code, out, err, secs)
                if first and first.message != failure.message:  # e.g. dropped mid-run, then refused
                    failure.message += f" (after {i + 1} attempts; the first ended with: {first.message})"
                raise failure
            first = first or failure
            if CANCELLED.wait(o.retry_backoff_s * (2 ** i)):
                raise _interrupted(what)
        raise AssertionError("unreachable")

    def classify(self, stderr: str) -> TransportError:
        """Turn ssh's own error output into an error that says what to do about it."""
        low = stderr.lower()
        o = self.opts
        kh = str(Path(o.known_hosts).expanduser()) if o.known_hosts else "~/.ssh/known_hosts"
        host_for_keys = o.host if not o.port or o.port == 22 else f"[{o.host}]:{o.port}"
        keyscan = f"ssh-keyscan {'-p ' + str(o.port) + ' ' if o.port else ''}{o.host} | ssh-keygen -lf -"
        verify = ("compare the key's fingerprint on the device's own console "
                  "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) with what the network offers "
                  f"(`{keyscan}`)")
        if HOSTKEY_CHANGED in low:
            fp = re.search(r"SHA256:[A-Za-z0-9+/=]+", stderr)
            return TransportError(
                f"{self.label}: the host key does NOT match {kh} "
                f"(offered {fp.group(0) if fp else 'an unknown key'}); refusing to connect",
                hint=f"{verify}; only if they agree (device reinstalled), remove the old entry with "
                     f"`ssh-keygen -R '{host_for_keys}' -f {kh}` and add the new one",
                kind="hostkey")
        if HOSTKEY_FAILED in low or "no ed25519 host key is known" in low or "host key is known" in low:
            return TransportError(
                f"{self.label}: the host key is not in {kh}; refusing to connect to an unverified device",
                hint=f"{verify}; then append it with `ssh-keyscan {'-p ' + str(o.port) + ' ' if o.port else ''}"
                     f"{o.host} >> {kh}`, or set first_contact = true to accept a new key once",
                kind="hostkey")
        if any(p in low for p in AUTH_FAILED):
            key = o.identity_file or "your default key / ssh-agent"
            return TransportError(
                f"{self.label}: authentication refused (public key {key})",
                hint=f"install the public key on the device: `ssh-copy-id -i {o.identity_file or '~/.ssh/id_ed25519'}.pub "
                     f"{'-p ' + str(o.port) + ' ' if o.port else ''}{self.label.rsplit(':', 1)[0] if o.port else self.label}`"
                     "; a passphrase-protected key must be loaded in ssh-agent (the farm never prompts)",
                kind="auth")
        last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        if any(p in low for p in LOST_PATTERNS):
            return TransportError(
                f"{self.label} stopped answering: {last}",
                hint=f"the device froze, lost power or left the network (no answer to ssh keepalives for "
                     f"{o.alive_interval_s * o.alive_count_max} s); check it on its console",
                kind="lost")
        if any(p in low for p in CONNECT_PATTERNS):
            return TransportError(f"{self.label} is unreachable: {last}",
                                  hint="is the device powered, on the network and running sshd? "
                                       f"(connect timeout {o.connect_timeout_s:g} s, {o.retries} retries)",
                                  kind="connect")
        own = [ln.strip() for ln in stderr.splitlines() if SSH_OWN.search(ln.strip())]
        if own:  # exit 255 with ssh's own words: ssh failed, the device's program never ran
            return TransportError(f"ssh failed for {self.label} (exit 255): {'; '.join(own[:2])[:300]}",
                                  hint="ssh itself could not run the step; check the ssh options of this device "
                                       "in the farm file (ssh_config, identity_file, known_hosts)",
                                  kind="ssh")
        return TransportError(f"{self.label}: {(stderr.strip().splitlines() or ['ssh failed'])[-1][:300]}",
                              kind="command")


class EmulatedTransport(LocalTransport):
    """An emulated ARM64 board on this machine (``exporter/emulate.py``): a local transport whose
    Python is the board's aarch64 Python under ``qemu-aarch64-static``.

    A program called ``python3`` (or ``python``) runs as ``python_argv`` + its arguments; any other
    program (mkdir, mv, rm, sh of the deployment) is a host program working on the same files.
    The environment is ``env`` (the host's without PYTHONPATH & co, which name x86 Python folders).
    """

    name = "emulated"

    def __init__(self, python_argv: list[str], label: str, env: Mapping[str, str]):
        super().__init__(label=label)
        self.capabilities = emulated_capabilities()
        self.python_argv = list(python_argv)
        self.env = dict(env)

    def run(self, argv: list[str], timeout: float, env: Mapping[str, str] | None = None, what: str = "") -> Result:
        argv = list(map(str, argv))
        cmd = self.python_argv + argv[1:] if argv and argv[0] in ("python3", "python") else argv
        code, out, err, secs = _run_process(cmd, timeout, cwd=self.home, env={**self.env, **(env or {})}, what=what)
        return Result(argv, code, out, err, secs)


def emulated_capabilities() -> Capabilities:
    """An emulated board's: QEMU translates every instruction (its latency is not the board's), and
    ExecuTorch ``.pte`` does not run there (its runtime needs an aarch64 torch)."""
    # Imported here: exporter.emulate builds EmulatedTransport, so it may not be needed at import time.
    from exporter.emulate import EMULATED_NOTE, PTE_NOTE

    return Capabilities(device_timings=False, timings_note=f"{EMULATED_NOTE} (QEMU translates every instruction)",
                        note=EMULATED_NOTE, refused_formats={"pte": PTE_NOTE})
