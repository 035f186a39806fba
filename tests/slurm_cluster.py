"""A real one-node Slurm cluster on loopback for tests: Debian's slurm-wlm and munge (installed with apt-get when
missing), configured in a temporary folder, started in the foreground as children of the test, stopped after it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]


def install_reason() -> str | None:
    """None when slurmctld, slurmd and munged are there (installed now if need be); otherwise why not."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "Slurm is not installed and apt-get (as root) is unavailable to install slurm-wlm and munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode:
            return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """munged, slurmctld and slurmd for one node named `node0` at 127.0.0.1 with `cpus` CPUs; `env` points Slurm's
    commands (sbatch, scontrol, scancel) at it."""

    def __init__(self, folder: Path, cpus: int = 2):
        self.folder = folder
        # cred_expire: Slurm holds a requeued job back until the old instance's credential expires (120 s by
        # default); 10 s keeps the requeue test short without starting a job whose credential is still revoked.
        self.cpus = cpus
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def _write_config(self) -> None:
        folder = self.folder
        for name in ("state", "spool", "log"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        memory_mb = 8000
        (folder / "slurm.conf").write_text(f"""\
ClusterName=loopback
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder / "munge.sock"},cred_expire=10
CredType=cred/munge
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=node0 NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=node0 Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={self.folder / 'munge.sock'}",
                f"--pid-file={self.folder / 'munged.pid'}",
                f"--log-file={self.folder / 'log' / 'munged.log'}",
                f"--seed-file={self.folder / 'munge.seed'}",
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> SlurmCluster:
        self._write_config()
        self._start_munge()
        log = (self.folder / "log" / "daemons.out").open("w")
        for command in (["slurmctld", "-D", "-c", "-i"], ["slurmd", "-D", "-N", "node0"]):
            self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm did not come up in 60 s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {path.name}\n{path.read_text()[-2000:]}" for path in (self.folder / "log").glob("*"))

    def stop(self) -> None:
        subprocess.run(["scancel", "--partition=debug"], env=self.env, capture_output=True)  # jobs a test left
        time.sleep(1)
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        pid_file = self.folder / "munged.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], capture_output=True)

    def run(self, *command: str) -> str:
        """A Slurm client command against this cluster; its stdout."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (JobState, Restarts, ExitCode, ...)."""
        fields = {}
        for token in self.run("scontrol", "show", "job", "-o", job_id).split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields
