"""The real cluster path: a two-node Ray cluster on this machine and `ray job submit`.

A head (`ray start --head`, loopback, 1 CPU) and a second node joined to it (1 CPU) make two
raylets; `ray job submit --working-dir .` runs jobs/pipeline.py on configs/debug.yaml as a user
submits it to their cluster. The run's two training workers need a CPU each, so they must land
on different nodes, and the run folder records which nodes they ran on. A second submission with
one export key changed re-runs export only.

Each node has its own temp dir, as each machine of a real cluster has its own disk: with one
shared by both, a job's driver lost its working directory when the job started
(`Cluster.start` says how); `test_job_keeps_its_working_directory` checks exactly that.

Every process the cluster started is stopped by pid (never `ray stop`, which would stop every Ray
on the machine).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("onnxruntime")
psutil = pytest.importorskip("psutil")

from helpers import REPO  # noqa: E402

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_processes(marker: str) -> list:
    """Every process whose command line names this cluster (its GCS address or its temp dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class Cluster:
    def __init__(self):
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        # The session's files (logs, sockets) name every process of this cluster. Short: a Unix
        # socket's path must fit in 107 bytes, and pytest's tmp_path is long.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.second_temp_dir = Path(tempfile.mkdtemp(prefix="ray2-", dir="/tmp"))
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Token authentication is on by default (the token in ~/.ray/auth_token): every client,
        # the joining node and `ray job` included, must say so. The state API address keeps Ray
        # Train's controller watcher on this cluster, not on another local Ray (pytest's).
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "RAY_AUTH_MODE": "token",
            "RAY_API_SERVER_ADDRESS": self.dashboard,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
        self.pids: set[int] = set()

    def ray(self, *args, timeout=180) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.pids |= {p.pid for p in self.processes()}
        return done

    def processes(self) -> list:
        """Ray names the GCS by the machine's address, not always loopback: match on the port."""
        return (
            _cluster_processes(f":{self.gcs_port}")
            + _cluster_processes(str(self.temp_dir))
            + _cluster_processes(str(self.second_temp_dir))
        )

    @staticmethod
    def _agent_ports() -> list[str]:
        """Free ports for a node's agents. Ray's defaults (52365 for the dashboard agent, ...) are
        fixed, so another Ray on this machine (the test session's own) or the other node of this
        cluster holds them already: the head's job agent would then never come up and every
        submission is refused with "No available agent to submit job"."""
        return [
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--dashboard-agent-grpc-port",
            str(_free_port()),
            "--runtime-env-agent-port",
            str(_free_port()),
            "--metrics-export-port",
            str(_free_port()),
        ]

    def start(self) -> None:
        head = self.ray(
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--num-cpus",
            "1",
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
            *self._agent_ports(),
        )
        assert head.returncode == 0, head.stdout + head.stderr
        # The second node's own temp dir. Without one it takes the head's, and both nodes'
        # runtime-env agents unpack a job's working_dir into the same folder,
        # <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>: the head's for the job's
        # supervisor, the folder the driver then runs in. When the driver's ray.init starts the
        # job, every node installs the job's runtime_env; the second node's agent has not seen
        # the URI yet, and Ray 2.60 unpacks a working_dir with overwrite=True (rmtree, then
        # unzip): the driver's cwd is deleted under it and a new folder takes its path. A driver
        # then has no cwd (getcwd() fails; relative paths find nothing), and the pipeline's driver
        # crashed when it first imported torch (oneMKL's loader; dynamo's debug dir).
        worker = self.ray(
            "start",
            "--address",
            self.address,
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "1",
            "--temp-dir",
            str(self.second_temp_dir),
            "--disable-usage-stats",
            *self._agent_ports(),
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr

    def node_ids(self, expected: int, timeout_s: float = 90) -> tuple[set[str], str]:
        """The alive nodes, once `expected` of them have registered (the dashboard comes up after
        `ray start` returns)."""
        deadline = time.monotonic() + timeout_s
        while True:
            listed = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json")
            nodes = (
                {n["node_id"] for n in json.loads(listed.stdout) if n["state"] == "ALIVE"}
                if listed.returncode == 0
                else set()
            )
            if len(nodes) >= expected or time.monotonic() > deadline:
                return nodes, listed.stdout + listed.stderr
            time.sleep(2)

    def submit(self, *args: str, log: Path, working_dir: str = ".") -> subprocess.CompletedProcess:
        """`ray job submit --working-dir WORKING_DIR -- python ARGS...`, from the repository root."""
        # The head's job agent starts a few seconds after the dashboard answers; until then Ray
        # refuses the submission ("No available agent to submit job"), before running anything.
        deadline = time.monotonic() + 120
        while True:
            done = self.ray(
                "job",
                "submit",
                "--address",
                self.dashboard,
                "--working-dir",
                working_dir,
                "--",
                "python",
                *args,
                timeout=900,
            )
            if "No available agent to submit job" not in done.stdout + done.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        log.write_text(done.stdout + done.stderr)
        return done

    def removed_working_dirs(self) -> list[str]:
        """The agents' log lines saying they deleted an unpacked working_dir to unpack it again."""
        logs = [*self.temp_dir.glob("session_2*/logs/*.log"), *self.second_temp_dir.glob("session_2*/logs/*.log")]
        return [
            line
            for log in logs
            for line in log.read_text(errors="replace").splitlines()
            if "Removing" in line and "working_dir_files" in line
        ]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process this cluster started, and what they started."""
        self.pids |= {p.pid for p in self.processes()}
        procs = []
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        # `ray start --head` names itself the machine's current cluster; a bare ray.init() would
        # then try to join this stopped one.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and f":{self.gcs_port}" in current.read_text():
            current.unlink()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(self.second_temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("ray", path=str(BIN)) is None:
        if os.environ.get("CI"):
            pytest.fail("the ray CLI is not installed next to this Python: `pip install -e '.[dev]'` installs it")
        pytest.skip("the ray CLI is not installed next to this Python")
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = [p for p in cluster.processes() if p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes of the test cluster still running: {[p.pid for p in left]}"


def _summary(run_dir: Path) -> dict[str, str]:
    summary = json.loads((run_dir / "pipeline_summary.json").read_text())
    return {s["stage"]: s["status"] for s in summary["stages"]}


# A job driver that checks its working directory (the unpacked working_dir) outlives the job's
# start on every node: it runs a task on each node, then compares its cwd with the one it began in.
PROBE = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
began, inode = os.getcwd(), os.stat(".").st_ino
ray.init()
on = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id())
nodes = sorted(ray.get([on.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                        for n in ray.nodes() if n["Alive"]]))
try:
    cwd = os.getcwd()
except FileNotFoundError as err:
    cwd = f"getcwd() failed: {err}"
now = os.stat(began).st_ino if os.path.exists(began) else None
print("PROBE " + json.dumps({"began": began, "cwd": cwd, "same_folder": now == inode, "nodes": nodes}))
"""


def test_job_keeps_its_working_directory(cluster, tmp_path):
    """The driver's cwd, the job's unpacked working_dir, is the same folder after the job's
    runtime_env was installed on both nodes (no node unpacks it over the driver's)."""
    nodes, listing = cluster.node_ids(expected=2)
    assert len(nodes) == 2, listing
    job = tmp_path / "job"
    job.mkdir()
    (job / "probe.py").write_text(PROBE)
    done = cluster.submit("probe.py", working_dir=str(job), log=tmp_path / "probe.log")
    assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout + done.stderr)[-4000:]
    probe = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert set(probe["nodes"]) == nodes, (probe, nodes)
    assert probe["cwd"] == probe["began"] and probe["same_folder"], (probe, cluster.removed_working_dirs())
    assert not cluster.removed_working_dirs()


def test_pipeline_job_on_a_two_node_cluster(cluster, tmp_path):
    nodes, listing = cluster.node_ids(expected=2)
    assert len(nodes) == 2, listing
    data, run = tmp_path / "data", tmp_path / "train"  # storage every node sees: absolute paths
    args = ["--config", "configs/debug.yaml", f"data.output_dir={data}", f"train.output_dir={run}"]
    first = cluster.submit("jobs/pipeline.py", *args, log=tmp_path / "first.log")
    assert first.returncode == 0 and "succeeded" in first.stdout, (first.stdout + first.stderr)[-4000:]

    assert _summary(run) == {
        "ingest": "ran",
        "safety": "off",
        "dedup": "off",
        "caption": "off",
        "shards": "ran",
        "cache": "off",
        "tune": "off",
        "train": "ran",
        "evaluate": "ran",
        "export": "ran",
        "finetune": "off",
        "align": "off",
    }
    for path in (
        data / "manifest.parquet",
        data / "shards" / "shard_manifest.csv",
        run / "checkpoints" / "step-00000010" / "ema.safetensors",
        run / "report.md",
        run / "model_card.md",
        data / "dataset_card.md",
        run / "export" / "diffusers" / "model_index.json",
        run / "export" / "onnx" / "denoiser.onnx",
        run / "export" / "onnx" / "denoiser.int8.onnx",
    ):
        assert path.exists(), path
    # The training workers ran on both nodes of the cluster, one each.
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert attempts[0]["world_size"] == 2 and set(attempts[0]["nodes"]) == nodes, (attempts, nodes)
    assert "sfumato serve --model" in first.stdout
    # The demo data's structure is measured on the last grid and on the training images.
    evaluated = next(
        s for s in json.loads((run / "pipeline_summary.json").read_text())["stages"] if s["stage"] == "evaluate"
    )
    structure = evaluated["result"]["demo_structure"]
    assert structure["training_images"] > 0.9 and 0 <= structure["samples"] <= 1, structure

    # The same job again with one export key changed: every stage before export is complete.
    trained = (run / "checkpoints" / "step-00000010" / "ema.safetensors").stat().st_mtime_ns
    second = cluster.submit("jobs/pipeline.py", *args, "export.int8=false", log=tmp_path / "second.log")
    assert second.returncode == 0 and "succeeded" in second.stdout, (second.stdout + second.stderr)[-4000:]
    assert _summary(run) == {
        "ingest": "skipped",
        "safety": "off",
        "dedup": "off",
        "caption": "off",
        "shards": "skipped",
        "cache": "off",
        "tune": "off",
        "train": "skipped",
        "evaluate": "skipped",
        "export": "ran",
        "finetune": "off",
        "align": "off",
    }
    assert (run / "checkpoints" / "step-00000010" / "ema.safetensors").stat().st_mtime_ns == trained
    assert (run / "export" / "onnx" / "denoiser.onnx").exists()
    assert not (run / "export" / "onnx" / "denoiser.int8.onnx").exists()
    # No node unpacked a job's working_dir over the folder its driver runs in.
    assert not cluster.removed_working_dirs()
