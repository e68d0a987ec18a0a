"""Every manifest in cluster/ against the KubeRay CRD schemas (../shared/kuberay/) and every pod
template against Kubernetes' own schemas (kubernetes-validate, offline), plus what the manifests
promise: CPU head with num-cpus 0, autoscaling GPU workers, token auth, pinned images, requests and
limits, and RayJob entrypoints that the project's own parsers accept."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = ROOT.parent / "shared" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IMAGE = re.compile(r"(^rayproject/ray:2\.60\.\d+-py311(-gpu)?$)|(^([\w.\-/]+/)?rlhf-tts:[\w.\-]*ray2\.60\.\d+-py311(-gpu)?$)")
K8S_VERSION = "1.33"


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def ray_documents() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in manifests() if doc["apiVersion"].startswith("ray.io/")]


def cluster_specs(doc: dict) -> list[dict]:
    return [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"]["rayClusterSpec"]]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    out = []
    for spec in cluster_specs(doc):
        out.append(("head", spec["headGroupSpec"]["template"]))
        out += [(f"worker {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return out


# ------------------------------------------------------------------------------ CRD schema checks

def strict_schema(schema: dict) -> dict:
    """What the API server enforces, for offline jsonschema: unknown fields are errors (the server
    would prune them silently) and int-or-string fields take either."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
            if node.get("nullable"):
                kind = node.get("type")
                if isinstance(kind, str):
                    node["type"] = [kind, "null"]
            if ("properties" in node and not node.get("x-kubernetes-preserve-unknown-fields")
                    and "additionalProperties" not in node):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    jsonschema = pytest.importorskip("jsonschema")
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (they ship with the project's shared/ folder)")
    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load((CRDS / name).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strict_schema(version["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(validators: dict, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


def test_cluster_has_the_expected_manifests():
    kinds = sorted(doc["kind"] for _, doc in ray_documents())
    assert kinds == ["RayCluster", "RayJob", "RayJob"], kinds
    assert all(doc["apiVersion"] == "ray.io/v1" for _, doc in ray_documents())


@pytest.mark.parametrize("name,doc", ray_documents(), ids=[n for n, _ in ray_documents()])
def test_manifest_matches_the_kuberay_crd(crd_validators, name, doc):
    assert crd_errors(crd_validators, doc) == []


def test_crd_check_rejects_unknown_fields_and_wrong_types(crd_validators):
    """The check itself must catch what an API server would prune or reject."""
    (_, cluster), = [(n, d) for n, d in ray_documents() if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert any("maxReplica" in e for e in crd_errors(crd_validators, typo))
    nested = copy.deepcopy(cluster)
    nested["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in crd_errors(crd_validators, nested))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert crd_errors(crd_validators, wrong)
    auth = copy.deepcopy(cluster)
    auth["spec"]["authOptions"]["mode"] = "password"
    assert crd_errors(crd_validators, auth)
    quantity = copy.deepcopy(cluster)  # int-or-string: both spellings are valid quantities
    quantity["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 2
    assert crd_errors(crd_validators, quantity) == []


# ------------------------------------------------------------------------- Kubernetes pod schemas

def pod_template_errors(template: dict) -> str | None:
    import kubernetes_validate

    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return str(err)
    return None


@pytest.mark.parametrize("name,doc", ray_documents(), ids=[n for n, _ in ray_documents()])
def test_pod_templates_match_kubernetes_schemas(name, doc):
    pytest.importorskip("kubernetes_validate")
    for group, template in pod_templates(doc):
        assert pod_template_errors(template) is None, f"{name} {group}"


def test_other_kubernetes_objects_validate_and_the_pod_check_catches_typos():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for name, doc in manifests():
        if not doc["apiVersion"].startswith("ray.io/"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (_, cluster), = [(n, d) for n, d in ray_documents() if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(cluster["spec"]["headGroupSpec"]["template"])
    bad["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert pod_template_errors(bad) is not None
    bad = copy.deepcopy(cluster["spec"]["headGroupSpec"]["template"])
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"
    assert pod_template_errors(bad) is not None


def test_kubernetes_validate_works_offline(monkeypatch):
    """The schemas ship inside the wheel: validation must not touch the network."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (_, cluster), = [(n, d) for n, d in ray_documents() if d["kind"] == "RayCluster"]
    assert pod_template_errors(cluster["spec"]["workerGroupSpecs"][0]["template"]) is None
    assert kubernetes_validate.utils.latest_version() >= K8S_VERSION


# ---------------------------------------------------------------------------- what they promise

@pytest.mark.parametrize("name,doc", ray_documents(), ids=[n for n, _ in ray_documents()])
def test_cluster_shape_auth_images_and_resources(name, doc):
    import ray

    for spec in cluster_specs(doc):
        assert spec["authOptions"]["mode"] == "token"
        assert spec["rayVersion"] == ray.__version__  # the same Ray everywhere (tests run the pinned one)
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["enableInTreeAutoscaling"] is True
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, "a GPU worker group"
        for group in gpu_groups:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 1
            assert "rollout_node" in group["rayStartParams"]["resources"]
        for where, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert IMAGE.match(container["image"]), f"{name} {where}: {container['image']} is not pinned"
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {where} {kind}"
                gpus = container["resources"]["limits"].get("nvidia.com/gpu")
                assert gpus == container["resources"]["requests"].get("nvidia.com/gpu")


def test_dockerfile_pins_ray_and_python_and_installs_the_project():
    """The image the manifests run is built FROM the Ray image of the pinned Ray and Python."""
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    match = re.fullmatch(r"rayproject/ray:(2\.60\.\d+)-(py311)-gpu", base)
    assert match, base
    assert re.search(r"pip install .*'\.\[tune\]'", text) and "COPY" in text
    images = {c["image"] for _, doc in ray_documents() for _, t in pod_templates(doc) for c in t["spec"]["containers"]}
    assert all(f"ray{match[1]}-{match[2]}" in image or image == base for image in images), images
    specs = [spec for _, doc in ray_documents() for spec in cluster_specs(doc)]
    assert {spec["rayVersion"] for spec in specs} == {match[1]}


def test_rayjob_entrypoints_parse_with_the_project_parsers():
    from rlhf_tts.config import load_config
    from rlhf_tts.tune import parse

    entry = {doc["metadata"]["name"]: shlex.split(doc["spec"]["entrypoint"]) for _, doc in ray_documents()
             if doc["kind"] == "RayJob"}
    commands = {tuple(argv[:3]) for argv in entry.values()}
    assert commands == {("python", "-m", "rlhf_tts.run"), ("python", "-m", "rlhf_tts.tune")}
    for name, argv in entry.items():
        if argv[2] == "rlhf_tts.run":
            cfg = load_config(None, argv[3:])
            assert cfg.distributed.rollout_resources == {"rollout_node": 1.0}
        else:
            flags = argv[3:]
            space_file = flags[flags.index("--space") + 1]
            flags[flags.index("--space") + 1] = str(ROOT / space_file)  # the image's working directory
            space, _ = parse(flags)
            assert space.base_config().distributed.rollout_resources == {"rollout_node": 1.0}
