"""A private OpenSSH server for tests: a "device" on 127.0.0.1 with its own host key and config.

It runs Debian's ``/usr/sbin/sshd`` (package openssh-server) in the foreground (``-D -e``) on a free
high port, with a host key, ``authorized_keys`` and client key generated in a temporary folder; the
system's own sshd (if any) and ~/.ssh are never touched. Nothing is faked: the farm talks to it with
the system ``ssh`` / ``scp`` exactly as it would to a Raspberry Pi.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
APT_HINT = "apt-get install -y openssh-server openssh-client"


def available() -> str | None:
    """None when a private sshd can run here, else the reason it cannot."""
    if not Path(SSHD).exists():
        return f"{SSHD} is missing ({APT_HINT})"
    for tool in ("ssh", "scp", "ssh-keygen", "ssh-keyscan"):
        if not shutil.which(tool):
            return f"{tool} is missing ({APT_HINT})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    """A new passphrase-less ed25519 key pair at ``path`` / ``path.pub``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"slm-test-{path.name}", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


class PrivateSshd:
    """An sshd on 127.0.0.1:<port> that accepts ``client_key`` for the current user."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(self.root / "ssh_host_ed25519_key")
        self.client_key = keygen(self.root / "client_key")
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)
        self.config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"
        self.config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"PidFile {self.root / 'sshd.pid'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            # The keys live under the test's tmp dir (below world-writable /tmp), which StrictModes
            # would refuse; this server only ever listens on loopback for one test.
            "StrictModes no",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "",
        ]))
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 15) -> "PrivateSshd":
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        check = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejects its config: {check.stderr.strip()}")
        log = open(self.log, "ab")
        # sshd needs an absolute path to re-execute itself for each connection.
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the listener (existing sessions keep running, as with `systemctl stop ssh`)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill_everything(self) -> None:
        """Power loss: kill the listener and every session process it started, with their programs."""
        import psutil

        if not self.proc:
            return
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in [psutil.Process(self.proc.pid)] + procs if self.proc.poll() is None else procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill_everything()

    # ------------------------------------------------------------ what a farm file needs

    def known_hosts_line(self) -> str:
        """The known_hosts entry of this server's host key (``[127.0.0.1]:port type key``)."""
        kind, key = (self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def write_known_hosts(self, path: Path) -> Path:
        Path(path).write_text(self.known_hosts_line())
        return Path(path)
