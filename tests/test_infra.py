"""infra/: the container image and the KubeRay manifests, checked without a cluster.

Every manifest parses; RayJob/RayCluster objects validate against KubeRay's CRDs (../shared/kuberay-crds)
and core objects against Kubernetes' own schemas (kubernetes-validate); each entrypoint's preset loads
through the job's own CLI and the GPU worker groups cover it; pods run non-root; infra/ holds no
credential. Every validator also gets a broken input it must reject, so none of them can pass silently.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rmoe_platform.cli import pipeline as pipeline_cli
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.33"  # the oldest Kubernetes the manifests target; kubernetes-validate ships its schemas
S3_SECRET = "rmoe-s3"
SIZED_FOR = "rmoe-platform/sized-for"  # a RayCluster's annotation: the presets it must be able to run
RAY_KINDS = ("RayJob", "RayCluster")
CORE_KINDS = ("Deployment", "Service", "Secret")

Manifest = dict[str, Any]


# ---- loading -------------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {twice}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_manifests(folder: Path = KUBERAY) -> list[tuple[str, Manifest]]:
    """Every YAML document under `folder`, labelled `file#index` so that a failure names its object."""
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        for index, doc in enumerate(yaml.load_all(path.read_text(), Loader=StrictLoader)):
            if doc is not None:
                docs.append((f"{path.name}#{index}", doc))
    return docs


def of_kind(*kinds: str) -> list[Any]:
    """pytest params of the manifests of these kinds, with readable ids."""
    return [pytest.param(doc, id=label) for label, doc in load_manifests() if doc.get("kind") in kinds]


def cluster_spec(obj: Manifest) -> Manifest:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_specs(obj: Manifest) -> Iterator[tuple[str, Manifest]]:
    """(role, pod spec) of every pod an object creates: a Deployment's, a Ray head/worker group's, a
    RayJob's submitter."""
    if obj["kind"] == "Deployment":
        yield "pod", obj["spec"]["template"]["spec"]
        return
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield "submitter", obj["spec"]["submitterPodTemplate"]["spec"]
    if obj["kind"] in RAY_KINDS:
        spec = cluster_spec(obj)
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"group {group['groupName']}", group["template"]["spec"]


def containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def ray_containers(obj: Manifest) -> Iterator[tuple[str, Manifest]]:
    """The containers that run Ray (head and workers) or the dashboard: those that read S3."""
    for role, pod in pod_specs(obj):
        if role != "submitter":
            for container in pod["containers"]:
                yield f"{role}/{container['name']}", container


def constraint(name: str) -> str:
    """The version constraints.txt pins `name` to."""
    text = (ROOT / "constraints.txt").read_text()
    match = re.search(rf"^{re.escape(name)}===?(\S+)", text, re.M | re.I)
    assert match, f"constraints.txt pins no {name}"
    return match.group(1)


def test_every_manifest_parses_into_named_objects() -> None:
    manifests = load_manifests()
    kinds = [doc.get("kind") for _, doc in manifests]
    for label, doc in manifests:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("metadata", {}).get("name"), label
    assert kinds.count("RayJob") >= 2 and "RayCluster" in kinds, kinds
    assert {"Deployment", "Service", "Secret"} <= set(kinds), kinds


@pytest.mark.parametrize("text", ["kind: Service\nkind: Deployment\n", "metadata: {name: [unclosed\n"])
def test_loading_rejects_duplicate_keys_and_malformed_yaml(tmp_path: Path, text: str) -> None:
    (tmp_path / "broken.yaml").write_text(text)
    with pytest.raises(yaml.YAMLError):
        load_manifests(tmp_path)


# ---- KubeRay CRDs --------------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """The schema with unknown fields rejected, as `kubectl apply` (field validation Strict) does; maps of
    arbitrary keys and objects that preserve unknown fields stay open."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = bool(schema.get("x-kubernetes-preserve-unknown-fields", False))
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """The v1 OpenAPI schema of a KubeRay CRD (ray.io_<kind>s.yaml), closed to unknown fields."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are ~1 MB each
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: Manifest) -> list[str]:
    if not CRDS.is_dir():
        pytest.skip(f"no KubeRay CRDs at {CRDS} (they live beside the project, in ../shared/kuberay-crds)")
    assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@pytest.mark.parametrize("obj", of_kind(*RAY_KINDS))
def test_kuberay_objects_validate_against_the_crds(obj: Manifest) -> None:
    assert crd_errors(obj) == []


def _misspelled_field(job: Manifest) -> None:
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")


def _numeric_start_param(job: Manifest) -> None:
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string


def _group_without_bounds(job: Manifest) -> None:
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]


def _bad_quantity(job: Manifest) -> None:
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["memory"] = "lots"


@pytest.mark.parametrize("breakage", [_misspelled_field, _numeric_start_param, _group_without_bounds, _bad_quantity])
def test_crd_schema_rejects_a_broken_rayjob(breakage) -> None:
    job = copy.deepcopy(next(doc for _, doc in load_manifests() if doc["kind"] == "RayJob"))
    breakage(job)
    assert crd_errors(job), f"{breakage.__name__} passed the CRD schema"


# ---- Kubernetes core objects ---------------------------------------------------------------------


def k8s_errors(obj: Manifest) -> list[str]:
    """kubernetes-validate's verdict (strict: unknown fields are errors) for the target Kubernetes."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path)) or '<root>'}: {err.message}"]
    return []


@pytest.mark.parametrize("obj", of_kind(*CORE_KINDS))
def test_core_objects_validate_against_kubernetes_schemas(obj: Manifest) -> None:
    assert k8s_errors(obj) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [(("spec", "replicas"), "one"), (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "x")],
)
def test_kubernetes_validate_rejects_a_broken_deployment(path: tuple[Any, ...], value: Any) -> None:
    deployment = copy.deepcopy(next(doc for _, doc in load_manifests() if doc["kind"] == "Deployment"))
    node = deployment
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert k8s_errors(deployment)


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(next(doc for _, doc in load_manifests() if doc["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRefs"] = {"name": S3_SECRET}
    assert k8s_errors(deployment)


# ---- the entrypoints' presets --------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What a cluster must run at once: `trials` copies of `experiment` (a sweep's concurrent trials)."""

    experiment: ExperimentConfig
    trials: int = 1


def entrypoint_workload(job: Manifest) -> Workload:
    """What a RayJob runs, parsed by the job's own CLI: `python jobs/<job>.py --config … --set …`.

    A sweep (`jobs/sweep.py`) runs its `SweepConfig.experiment` in up to `max_concurrent_trials` trials."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), f"entrypoint runs no job of this repo: {argv[:2]}"
    if argv[1] == "jobs/pipeline.py":
        args = pipeline_cli.parser(None).parse_args(argv[2:])
        args.config = ROOT / args.config
        return Workload(pipeline_cli.load_experiment(args))
    if argv[1] == "jobs/sweep.py":
        from rmoe_platform.cli import sweep as sweep_cli
        from rmoe_platform.sweep.config import SweepConfig

        args = sweep_cli.parser(None).parse_args(argv[2:])
        overrides = [*args.overrides, *([f"experiment.results={args.results}"] if args.results else [])]
        sweep = SweepConfig.load(ROOT / args.config, overrides)
        return Workload(sweep.experiment, sweep.max_concurrent_trials or 1)
    raise AssertionError(f"no loader for the entrypoint {argv[1]}")


def sized_for(cluster: Manifest) -> list[Workload]:
    """The presets a long-lived RayCluster names in its `rmoe-platform/sized-for` annotation."""
    names = cluster["metadata"].get("annotations", {}).get(SIZED_FOR, "")
    paths = [name.strip() for name in names.split(",") if name.strip()]
    assert paths, f"RayCluster {cluster['metadata']['name']} names no preset in its {SIZED_FOR} annotation"
    return [Workload(ExperimentConfig.load(ROOT / path)) for path in paths]


def workloads_of(obj: Manifest) -> list[Workload]:
    return [entrypoint_workload(obj)] if obj["kind"] == "RayJob" else sized_for(obj)


@pytest.mark.parametrize("obj", of_kind(*RAY_KINDS))
def test_entrypoint_and_cluster_presets_load(obj: Manifest) -> None:
    for workload in workloads_of(obj):
        for spec in filter(None, (workload.experiment.scaling, workload.experiment.moe_scaling)):
            assert spec.num_workers % spec.expert_parallel_size == 0


def test_an_entrypoint_with_a_missing_preset_is_refused() -> None:
    job = {"spec": {"entrypoint": "python jobs/pipeline.py --config configs/k8s/no_such_preset.yaml"}}
    with pytest.raises(ConfigError, match="no such file"):
        entrypoint_workload(job)


# ---- GPU worker groups versus the presets --------------------------------------------------------


@dataclass(frozen=True)
class WorkerGroup:
    """What Ray sees of a worker group: pods at start and at most, logical GPUs and CPUs per pod."""

    name: str
    replicas: int
    max_replicas: int
    gpus: float
    cpus: float


def quantity(value: str | int | float) -> float:
    """A CPU quantity ("8", "500m") in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_resources(group: Manifest) -> tuple[float, float]:
    """(GPUs, CPUs) Ray advertises for a group's pods: rayStartParams, else the container's limits."""
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    requests = container.get("resources", {}).get("requests", {})
    params = group.get("rayStartParams", {})
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    cpus = quantity(params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0))))
    return gpus, cpus


def worker_groups(cluster: Manifest) -> list[WorkerGroup]:
    groups = []
    for group in cluster_spec(cluster).get("workerGroupSpecs", []):
        gpus, cpus = pod_resources(group)
        replicas = group.get("replicas", group["minReplicas"])
        groups.append(WorkerGroup(group["groupName"], replicas, group["maxReplicas"], gpus, cpus))
    return groups


def worker_slots(group: WorkerGroup, gpu: float, cpu: float) -> int:
    """How many Train workers of {GPU: gpu > 0, CPU: cpu} fit in one pod of the group (a worker's
    reservation never spans pods)."""
    by_cpu = group.cpus / cpu if cpu else math.inf
    return math.floor(min(group.gpus / gpu, by_cpu) + 1e-9)


def coverage_problems(cluster: Manifest, workload: Workload) -> list[str]:
    """Why a workload's GPU stages could not run on this cluster: too few worker slots for its concurrent
    trials even at maxReplicas, or no CPU left for Ray Data at start (a stage checks that before it asks
    for its workers)."""
    problems = []
    exp, groups = workload.experiment, worker_groups(cluster)
    head_cpus = pod_resources(cluster_spec(cluster)["headGroupSpec"])[1]
    for field in ("scaling", "moe_scaling"):
        spec = getattr(exp, field)
        if spec is None or not spec.use_gpu:
            continue
        gpu, cpu = spec.gpus_per_worker, spec.cpus_per_worker
        need = workload.trials * spec.num_workers
        peak = sum(g.max_replicas * worker_slots(g, gpu, cpu) for g in groups)
        if peak < need:
            problems.append(
                f"{exp.name}.{field}: {workload.trials} x {spec.num_workers} workers x {{GPU: {gpu:g}, CPU: {cpu:g}}}, "
                f"but the worker groups hold at most {peak} (maxReplicas x workers per pod)"
            )
        cpus_at_start = head_cpus + sum(g.replicas * g.cpus for g in groups)
        if cpus_at_start - cpu * spec.num_workers < 1:
            problems.append(
                f"{exp.name}.{field}: {spec.num_workers} workers x {cpu:g} CPU leave none of the {cpus_at_start:g} "
                "CPUs up at start for Ray Data (raise replicas/minReplicas or num-cpus)"
            )
    return problems


def group_problems(cluster: Manifest) -> list[str]:
    """GPU requests, limits and Ray's num-gpus agree per group; bounds are ordered; the head has no GPU."""
    problems = []
    spec = cluster_spec(cluster)
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-gpus") != "0":
        problems.append('head: rayStartParams.num-gpus must be "0" (no Train worker on the head)')
    for group in spec.get("workerGroupSpecs", []):
        name, resources = group["groupName"], group["template"]["spec"]["containers"][0].get("resources", {})
        limit, request = resources.get("limits", {}), resources.get("requests", {})
        gpus = limit.get("nvidia.com/gpu")
        if gpus is None or request.get("nvidia.com/gpu", gpus) != gpus:
            problems.append(f"{name}: nvidia.com/gpu needs a limit, and a request equal to it")
        if group.get("rayStartParams", {}).get("num-gpus") != gpus:
            problems.append(f"{name}: rayStartParams.num-gpus must equal the pod's nvidia.com/gpu ({gpus})")
        if "cpu" not in request or "memory" not in request:
            problems.append(f"{name}: CPU and memory requests are needed (Ray Data decodes on the CPUs)")
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"{name}: needs minReplicas <= replicas <= maxReplicas")
    return problems


@pytest.mark.parametrize("obj", of_kind(*RAY_KINDS))
def test_gpu_worker_groups_cover_the_presets(obj: Manifest) -> None:
    assert group_problems(obj) == []
    for workload in workloads_of(obj):
        assert coverage_problems(obj, workload) == []


def _demo_job() -> Manifest:
    return copy.deepcopy(next(doc for _, doc in load_manifests() if doc["metadata"]["name"] == "rmoe-demo"))


def test_coverage_check_rejects_too_few_gpus() -> None:
    job = _demo_job()
    workload = entrypoint_workload(job)
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group.update(replicas=1, minReplicas=1, maxReplicas=1)
    assert any("hold at most 1" in p for p in coverage_problems(job, workload))
    group.update(maxReplicas=2)
    assert any("hold at most 2" in p for p in coverage_problems(job, Workload(workload.experiment, trials=2)))


def test_coverage_check_rejects_a_cluster_with_no_cpu_left_for_data() -> None:
    job = _demo_job()
    workload = entrypoint_workload(job)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "2"
    assert any("for Ray Data" in p for p in coverage_problems(job, workload))


def test_group_check_rejects_gpu_counts_that_disagree() -> None:
    job = _demo_job()
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["rayStartParams"]["num-gpus"] = "2"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = "1"
    assert len(group_problems(job)) == 2


# ---- security contexts ---------------------------------------------------------------------------


def container_security_problems(where: str, ctx: Manifest) -> list[str]:
    problems = []
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if "ALL" not in ctx.get("capabilities", {}).get("drop", []) or ctx.get("capabilities", {}).get("add"):
        problems.append(f"{where}: capabilities must drop ALL and add none")
    if ctx.get("privileged") or ctx.get("runAsUser") == 0 or ctx.get("runAsNonRoot") is False:
        problems.append(f"{where}: must not run privileged or as root")
    return problems


def pod_security_problems(role: str, pod: Manifest) -> list[str]:
    ctx = pod.get("securityContext", {})
    problems = []
    if ctx.get("runAsNonRoot") is not True or not ctx.get("runAsUser"):
        problems.append(f"{role}: pod securityContext needs runAsNonRoot: true and a non-zero runAsUser")
    if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{role}: pod securityContext needs seccompProfile RuntimeDefault")
    if any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")):
        problems.append(f"{role}: no host namespaces")
    for container in containers(pod):
        problems += container_security_problems(f"{role}/{container['name']}", container.get("securityContext", {}))
    return problems


def security_problems(obj: Manifest) -> list[str]:
    """Restricted-profile essentials for every pod and container the object creates, the Ray autoscaler's
    sidecar included."""
    problems = [p for role, pod in pod_specs(obj) for p in pod_security_problems(role, pod)]
    if obj["kind"] in RAY_KINDS and cluster_spec(obj).get("enableInTreeAutoscaling"):
        ctx = cluster_spec(obj).get("autoscalerOptions", {}).get("securityContext", {})
        problems += container_security_problems("autoscaler", ctx)
        if ctx.get("runAsNonRoot") is not True:
            problems.append("autoscaler: runAsNonRoot must be true")
    return problems


@pytest.mark.parametrize("obj", of_kind("Deployment", *RAY_KINDS))
def test_pods_run_as_non_root_without_privilege_escalation(obj: Manifest) -> None:
    assert security_problems(obj) == []


def test_security_check_rejects_root_and_escalation() -> None:
    job = _demo_job()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["securityContext"]["runAsUser"] = 0
    del head["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    problems = security_problems(job)
    assert any("non-zero runAsUser" in p for p in problems)
    assert any("allowPrivilegeEscalation" in p for p in problems)


# ---- credentials ---------------------------------------------------------------------------------

CREDENTIAL_NAME = re.compile(r"ACCESS_KEY|SECRET|TOKEN|PASSWORD", re.I)
ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_LIKE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
ASSIGNMENT = re.compile(
    r"\b(aws_secret_access_key|aws_access_key_id|aws_session_token|secret_key|access_key|password|auth_token)\b"
    r"[\"']?\s*[:=]\s*[\"']?([^\s\"',}]+)",
    re.I,
)
PLACEHOLDER = re.compile(r"REPLACE_ME|^[$<{]|^\.\.\.$|^…$")


def looks_secret(token: str) -> bool:
    """A 40-character AWS-secret-like token: mixed case with digits or /+, not a hex digest."""
    classes = (r"[a-z]", r"[A-Z]", r"[0-9/+]")
    return all(re.search(c, token) for c in classes) and not re.fullmatch(r"[0-9a-fA-F]+", token)


def text_findings(text: str, where: str) -> list[str]:
    """Things in a file that look like credentials: access key ids, secret keys, `secret = <value>` lines
    whose value is not a placeholder (REPLACE_ME, $VAR, <…>)."""
    found = [f"{where}: access key id {m.group(0)[:4]}…" for m in ACCESS_KEY_ID.finditer(text)]
    found += [f"{where}: secret-like string {m[0][:4]}…" for m in SECRET_LIKE.finditer(text) if looks_secret(m[0])]
    for match in ASSIGNMENT.finditer(text):
        if not PLACEHOLDER.search(match.group(2)):
            found.append(f"{where}: literal value for {match.group(1)}")
    return found


def manifest_findings(label: str, obj: Manifest) -> list[str]:
    """Credentials written into manifests: inline `env` values under credential names (they must come from
    a Secret), and Secret templates holding anything but placeholders."""
    found = []
    envs = [(f"{role}/{c['name']}", c.get("env", [])) for role, pod in pod_specs(obj) for c in containers(pod)]
    if obj["kind"] in RAY_KINDS:
        envs.append(("autoscaler", cluster_spec(obj).get("autoscalerOptions", {}).get("env", [])))
    for where, env in envs:
        inline = [e["name"] for e in env if CREDENTIAL_NAME.search(e["name"]) and "value" in e]
        found += [f"{label} {where}: inline value for {name}" for name in inline]
    if obj["kind"] == "Secret":
        values = {**obj.get("stringData", {}), **obj.get("data", {})}
        filled = [
            key for key, value in values.items() if CREDENTIAL_NAME.search(key) and not PLACEHOLDER.search(str(value))
        ]
        found += [f"{label}: Secret key {key} holds a value" for key in filled]
    return found


def credential_findings(folder: Path = INFRA) -> list[str]:
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        found += text_findings(path.read_text(errors="replace"), str(path.relative_to(folder)))
    for label, obj in load_manifests(folder / "kuberay") if (folder / "kuberay").is_dir() else []:
        found += manifest_findings(label, obj)
    return found


def test_no_literal_credentials_anywhere_in_infra() -> None:
    assert credential_findings() == []


def test_credential_scanner_flags_planted_credentials(tmp_path: Path) -> None:
    fake_id = "AKIA" + "Q" * 16  # built here, so that no credential-shaped literal sits in the repo
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    (tmp_path / "notes.md").write_text(f"export AWS_ACCESS_KEY_ID={fake_id}\nkey {fake_secret}\n")
    (tmp_path / "config").write_text("[default]\naws_secret_access_key = hunter2hunter2\n")
    kuberay = tmp_path / "kuberay"
    kuberay.mkdir()
    job = _demo_job()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "k"}}}]
    head["env"].append({"name": "RAY_AUTH_TOKEN", "value": "t0ken"})
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    secret["stringData"] = {"AWS_SECRET_ACCESS_KEY": "x"}
    (kuberay / "job.yaml").write_text(yaml.safe_dump_all([job, secret]))
    found = "\n".join(credential_findings(tmp_path))
    assert "access key id" in found and "secret-like string" in found
    assert "literal value for aws_secret_access_key" in found
    assert "inline value for RAY_AUTH_TOKEN" in found and "AWS_SECRET_ACCESS_KEY holds a value" in found
    assert "inline value for AWS_SECRET_ACCESS_KEY" not in found  # valueFrom a Secret is fine


@pytest.mark.parametrize("obj", of_kind("Deployment", *RAY_KINDS))
def test_s3_settings_come_from_the_secret_through_env_from(obj: Manifest) -> None:
    for where, container in ray_containers(obj):
        refs = [source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])]
        assert S3_SECRET in refs, f"{where} does not read the {S3_SECRET} Secret through envFrom"


# ---- image, versions, dashboard, docs ------------------------------------------------------------


def test_image_is_the_official_ray_image_at_the_pinned_versions() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M)
    cuda = constraint("cuda-toolkit").split(".")  # the CUDA of PyPI's torch build, e.g. 13.0.x
    assert base and base.group(1) == f"rayproject/ray:{constraint('ray')}-py311-cu{cuda[0]}{cuda[1]}"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert "MMCV_WITH_OPS=1" in text and "--no-build-isolation" in text and "FORCE_CUDA=1" in text
    assert not re.search(r"^(ENV|ARG)\b.*(AWS_|SECRET|TOKEN)", text, re.M | re.I)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*" and "!.git" not in rules  # an allow-list: only what it names enters the image


@pytest.mark.parametrize("obj", of_kind(*RAY_KINDS))
def test_clusters_run_the_pinned_ray_in_one_image(obj: Manifest) -> None:
    assert cluster_spec(obj)["rayVersion"] == constraint("ray")
    images = {c["image"] for _, pod in pod_specs(obj) for c in containers(pod)}
    assert len(images) == 1, images


def test_dashboard_serves_streamlit_over_the_s3_results() -> None:
    (deployment,) = [doc for _, doc in load_manifests() if doc["kind"] == "Deployment"]
    (service,) = [doc for _, doc in load_manifests() if doc["kind"] == "Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["streamlit", "run", "dashboard/app.py"]
    app_args = command[command.index("--") + 1 :]
    assert app_args[0] == "--results" and app_args[1].startswith("s3://")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/_stcore/health"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [8501] == [p["containerPort"] for p in container["ports"]]


def test_infra_readme_covers_every_manifest_and_step() -> None:
    readme = (INFRA / "README.md").read_text()
    for path in KUBERAY.glob("*.yaml"):
        assert f"infra/kuberay/{path.name}" in readme, f"infra/README.md never mentions {path.name}"
    steps = ["docker build", "docker push", "create secret generic rmoe-s3", "prepare_data.py", "apply -f"]
    steps += ["logs -f job/", "ray job logs", "port-forward", "ray job submit", "ScalingConfig", "expert_parallel_size"]
    steps += ["MinIO", "AWS_ENDPOINT_URL"]
    assert [step for step in steps if step not in readme] == []
