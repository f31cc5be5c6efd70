"""The deployment files: cluster.yaml against Ray's cluster-launcher schema, k8s/rayjob.yaml
against KubeRay's RayJob CRD, and configs/scale.yaml against both (the GPUs it asks for are the
GPUs they provide, its paths are on the storage they mount)."""

import gzip
import json
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

from sfumato.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml.gz"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _yaml(REPO / "cluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _yaml(REPO / "k8s" / "rayjob.yaml")


@pytest.fixture(scope="module")
def scale():
    # Its sources are on the cluster's shared storage, not on this machine.
    return load_config(REPO / "configs" / "scale.yaml", inputs=False)


def test_cluster_yaml_passes_rays_schema(cluster):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # the file as written: no unknown or mistyped keys
    validate_config(prepare_config(cluster))  # as `ray up` fills in the provider's defaults


def test_cluster_yaml_has_a_cpu_head_gpu_workers_and_installs_the_project(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_workers
    repo_mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert any(local == "./configs" for local in cluster["file_mounts"].values())
    assert any(f"cd {repo_mount}" in c and "pip install -e" in c for c in cluster["setup_commands"])


def _strict(schema):
    """The CRD's schema with unknown keys refused wherever it lists an object's fields (the API
    server would silently drop a misspelt field; this test should not)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def test_rayjob_manifest_passes_the_kuberay_crd(rayjob):
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    assert crd["spec"]["names"]["kind"] == rayjob["kind"]
    group, version = rayjob["apiVersion"].split("/")
    assert crd["spec"]["group"] == group
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = _strict(served[version]["schema"]["openAPIV3Schema"])
    jsonschema.validate(rayjob, schema)

    misspelt = json.loads(json.dumps(rayjob))
    misspelt["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolice"):
        jsonschema.validate(misspelt, schema)


def test_rayjob_runs_the_pipeline_on_the_installed_ray(rayjob, scale):
    spec = rayjob["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "/home/ray/sfumato/jobs/pipeline.py"]
    config = entry[entry.index("--config") + 1]
    assert (REPO / config.removeprefix("/home/ray/sfumato/")).exists()
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}" in (REPO / "k8s" / "Dockerfile").read_text()
    # Every pod mounts the shared volume where the config writes.
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    ]
    for pod in pods:
        mounts = {m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        for path in (scale.data.output_dir, scale.train.output_dir):
            assert any(str(path).startswith(m + "/") for m in mounts), (path, mounts)


def test_scale_config_fills_the_gpus_both_clusters_provide(scale, cluster, rayjob):
    t = scale.train
    assert t.use_gpu and t.precision == "bf16" and t.zero_stage == 2
    per_node = [n for n in cluster["available_node_types"].values() if n["resources"].get("GPU")][0]
    assert t.num_workers == per_node["max_workers"] * per_node["resources"]["GPU"]
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert t.num_workers == gpus
    assert t.num_workers * t.cpus_per_worker <= per_node["max_workers"] * per_node["resources"]["CPU"]
    assert t.checkpoint_every_steps < t.total_steps


def test_readme_cost_table_matches_scale_yaml_and_the_benchmark(scale):
    """The README's estimate is computed for this config (its GPUs, its images) from the figure
    BENCHMARKS.md measured for its model, micro-batch and ZeRO stage."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Scale") :]
    t = scale.train
    stage = t.stages[0]
    images = t.total_steps * t.effective_batch(stage)
    assert f"{t.num_workers} GPUs" in section
    assert re.search(rf"{images / 1e6:.1f} ?M images", section), images
    bench = (REPO / "BENCHMARKS.md").read_text()
    row = re.search(
        rf"\| {t.model} \| [^|]+ \| \d+ \| {stage.micro_batch_size} \| {t.zero_stage} \| ([\d.]+) \|", bench
    )
    assert row, f"BENCHMARKS.md has no {t.model} row at micro-batch {stage.micro_batch_size}, ZeRO {t.zero_stage}"
    per_gpu = float(row.group(1))
    assert f"{per_gpu} images/s" in section
    efficiency = float(re.search(r"assumed (\d+)% data-parallel efficiency", section).group(1)) / 100
    throughput = per_gpu * t.num_workers * efficiency
    hours = images / throughput / 3600
    table_row = next(line for line in section.splitlines() if "(scale.yaml)" in line)
    assert f"| {throughput:,.0f} | {hours:.1f} h | {hours * t.num_workers:.0f} |" in table_row, table_row
