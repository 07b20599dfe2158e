"""The KubeRay manifests in k8s/: strict validation against KubeRay's CRD schemas, and the
conventions the runtime relies on (tier resources, the storage path, Serve import paths, the
admin token).

KubeRay's CRDs are structural schemas: the API server prunes unknown fields silently, so a typo
in a manifest is lost without a word. Here every object schema that lists its properties is
closed (``additionalProperties: false``), so an unknown field is an error naming it. The CRDs are
data under ``../shared/schemas/kuberay/`` (``WEIGHTPOOL_KUBERAY_CRDS`` overrides the folder);
without them only the schema tests skip.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = Path(
    os.environ.get("WEIGHTPOOL_KUBERAY_CRDS", ROOT.parent / "shared" / "schemas" / "kuberay")
)
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}
KNOWN_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayService"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
}
POOL_RESOURCES = {"weightpool_hbm", "weightpool_host", "weightpool_cxl", "weightpool_storage"}
START_COMMAND = "weightpool start --address auto --config /etc/weightpool/pool.yaml"
SERVE_APPS = {
    "weightpool-admin": ("api.serve:admin_app", "/admin"),
    "weightpool-embed": ("api.serve:embed_app", "/embed"),
}
needs_crds = pytest.mark.skipif(
    not all((CRD_DIR / name).is_file() for name in CRD_FILES.values()),
    reason=f"KubeRay CRDs not found in {CRD_DIR}",
)

# -- the documents -------------------------------------------------------------------------


@functools.cache
def _documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path.name, document))
    return tuple(found)


def documents(kind: str | None = None) -> list[dict[str, Any]]:
    """Deep copies, so a test may mutate what it gets."""
    return [copy.deepcopy(d) for _, d in _documents() if kind is None or d.get("kind") == kind]


def one(kind: str) -> dict[str, Any]:
    (document,) = documents(kind)
    return document


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster's spec and the RayService's rayClusterConfig: both must hold every rule."""
    return [
        ("RayCluster", one("RayCluster")["spec"]),
        ("RayService", one("RayService")["spec"]["rayClusterConfig"]),
    ]


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = [("head", spec["headGroupSpec"])]
    return head + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def custom_resources(group: dict[str, Any]) -> dict[str, Any]:
    """rayStartParams.resources in KubeRay's form: a JSON string literal holding a JSON object
    (``'"{\\"a\\": 1}"'``), since KubeRay pastes it into a shell command line."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    inner = json.loads(raw)
    assert isinstance(inner, str), f"resources {raw!r}: expected a quoted JSON string"
    parsed = json.loads(inner)
    assert isinstance(parsed, dict), f"resources {raw!r}: expected a JSON object inside"
    return parsed


def pool_config() -> dict[str, Any]:
    configmaps = {c["metadata"]["name"]: c for c in documents("ConfigMap")}
    return yaml.safe_load(configmaps["weightpool-config"]["data"]["pool.yaml"])


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity_bytes(value: str | int) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([KMGTP]i|[kMGTP])?", str(value)).groups()
    return int(float(number) * _UNITS[unit or ""])


# -- strict schemas ------------------------------------------------------------------------


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural schema that rejects what the API server would prune."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


DNS_LABEL = {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# CRDs leave metadata as a bare object; this is the part of ObjectMeta a manifest may set.
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": DNS_LABEL,
        "namespace": DNS_LABEL,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTP]i|[kMGTP])?$"}
# The subset of core/v1 these manifests use, closed the same way.
CORE_SCHEMAS = {
    "ConfigMap": {"data": STRING_MAP},
    "PersistentVolumeClaim": {
        "spec": {
            "type": "object",
            "required": ["accessModes", "resources"],
            "additionalProperties": False,
            "properties": {
                "accessModes": {
                    "type": "array",
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"]},
                },
                "storageClassName": {"type": "string"},
                "resources": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "requests": {
                            "type": "object",
                            "required": ["storage"],
                            "additionalProperties": False,
                            "properties": {"storage": QUANTITY},
                        }
                    },
                },
            },
        }
    },
}


def _list_map_keys(validator: Any, keys: list[str], instance: Any, _schema: Any) -> Iterator:
    """The API server refuses two items of a list-type=map list with the same key."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {index} share the key {dict(zip(keys, key, strict=True))}"
            )
        seen.setdefault(key, index)


def _cel_rules(_validator: Any, rules: list[dict], _instance: Any, _schema: Any) -> Iterator:
    """CEL rules (x-kubernetes-validations) cannot be evaluated here: a manifest leaves such
    fields to their defaults rather than pass unchecked."""
    messages = "; ".join(rule.get("message", rule["rule"]) for rule in rules)
    yield jsonschema.ValidationError(f"field has CEL rules this test cannot check ({messages})")


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,  # OpenAPI 3.0 schemas are close to drafts 4 to 7; 7 has const
    {"x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-validations": _cel_rules},
)


@functools.cache
def validator(kind: str) -> Any:
    if kind in CORE_SCHEMAS:
        schema = {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", *CORE_SCHEMAS[kind]],
            "additionalProperties": False,
            "properties": {
                "apiVersion": {"const": "v1"},
                "kind": {"const": kind},
                "metadata": METADATA,
                **CORE_SCHEMAS[kind],
            },
        }
        return StrictValidator(schema)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 18k lines each
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]  # the operator's to write, never a manifest's
    schema["properties"] |= {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": kind},
        "metadata": METADATA,
    }
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return StrictValidator(schema)


def errors(document: dict[str, Any]) -> list[str]:
    """Every violation as 'path: message', paths like spec.workerGroupSpecs[0].replicas."""
    found = validator(document["kind"]).iter_errors(document)
    return sorted(f"{dotted(error.absolute_path) or '<root>'}: {error.message}" for error in found)


def dotted(path: Iterable[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# -- the tests -----------------------------------------------------------------------------


def test_every_yaml_in_k8s_is_a_known_manifest() -> None:
    assert not list(K8S.glob("*.yml")), "name manifests *.yaml: *.yml is not checked"
    kinds = [(d.get("apiVersion"), d.get("kind")) for _, d in _documents()]
    assert set(kinds) <= KNOWN_KINDS, f"unexpected documents: {set(kinds) - KNOWN_KINDS}"
    assert sorted(kinds) == sorted(KNOWN_KINDS), "one document of each kind is expected"


@needs_crds
@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_ray_manifests_validate_strictly(kind: str) -> None:
    assert errors(one(kind)) == []


@pytest.mark.parametrize("kind", ["ConfigMap", "PersistentVolumeClaim"])
def test_core_manifests_validate_strictly(kind: str) -> None:
    assert errors(one(kind)) == []


def _at(document: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    node = document
    for step in path:
        node = node[step]
    return node


_CLUSTER = {"RayCluster": ("spec",), "RayService": ("spec", "rayClusterConfig")}
_WORKER = ("workerGroupSpecs", 0, "template", "spec", "containers", 0)
_HEAD = ("headGroupSpec", "template", "spec", "containers", 0)


@needs_crds
@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
@pytest.mark.parametrize(
    ("base", "inside", "field"),
    [
        ("spec", (), "replicaz"),  # the top of spec
        ("cluster", (), "workerGroupSpec"),  # the top of the cluster spec, a near miss
        ("cluster", (*_WORKER, "resources"), "limitz"),  # deep inside a container
        ("cluster", (*_HEAD, "volumeMounts", 0), "mountpath"),
        ("root", ("metadata",), "nmae"),
    ],
)
def test_an_unknown_field_is_rejected_by_name(
    kind: str, base: str, inside: tuple[str | int, ...], field: str
) -> None:
    document = one(kind)
    target = (*{"root": (), "spec": ("spec",), "cluster": _CLUSTER[kind]}[base], *inside)
    _at(document, target)[field] = 1
    assert errors(document) == [
        f"{dotted(target)}: Additional properties are not allowed ('{field}' was unexpected)"
    ]


@needs_crds
@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("workerGroupSpecs", 0, "replicas"), "two", "'two' is not of type 'integer'"),
        (("headGroupSpec", "rayStartParams", "num-cpus"), 8, "8 is not of type 'string'"),
        ((*_WORKER, "resources", "limits", "memory"), "lots", "'lots' does not match"),
        ((*_WORKER, "resources", "limits", "cpu"), 1.5, "1.5 is not valid under any"),
        (("enableInTreeAutoscaling",), "false", "'false' is not of type 'boolean'"),
    ],
)
def test_a_wrong_type_is_rejected(path: tuple, value: Any, message: str) -> None:
    document = one("RayCluster")
    _at(document, ("spec", *path[:-1]))[path[-1]] = value
    (error,) = errors(document)
    assert error.startswith(f"{dotted(('spec', *path))}: {message}"), error


@needs_crds
def test_int_or_string_quantities_accept_integers() -> None:
    document = one("RayCluster")
    _at(document, ("spec", *_WORKER, "resources", "limits"))["cpu"] = 32
    assert errors(document) == []


@needs_crds
def test_a_duplicate_list_map_key_is_rejected() -> None:
    document = one("RayCluster")
    env = _at(document, ("spec", *_HEAD, "env"))
    env.append(dict(env[0]))
    assert errors(document) == [
        "spec.headGroupSpec.template.spec.containers[0].env: "
        "items 0 and 1 share the key {'name': 'WEIGHTPOOL_ADMIN_TOKEN'}"
    ]


def test_the_rayservice_runs_the_same_cluster_as_the_raycluster() -> None:
    (_, cluster), (_, service) = cluster_specs()
    assert service == cluster


@pytest.mark.parametrize("which", ["RayCluster", "RayService"])
def test_custom_resources_mark_the_tier_hosts(which: str) -> None:
    spec = dict(cluster_specs())[which]
    storage_dir = pool_config()["storage_dir"]
    offered: set[str] = set()
    for name, group in groups(spec):
        resources = custom_resources(group)
        assert set(resources) <= POOL_RESOURCES, f"{name}: {set(resources) - POOL_RESOURCES}"
        assert all(type(v) is int and v > 0 for v in resources.values()), (name, resources)
        assert "resources" not in group, f"{name}: group-level resources override rayStartParams"
        ray = containers(group)[0]  # KubeRay runs Ray in the first container
        gpus = int(ray["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert resources.get("weightpool_hbm", 0) == gpus, f"{name}: one weightpool_hbm per GPU"
        assert not (gpus and "weightpool_cxl" in resources), f"{name}: CXL group is CPU-only"
        mounts = {m["mountPath"] for m in ray.get("volumeMounts", [])}
        assert ("weightpool_storage" in resources) == (storage_dir in mounts), (
            f"{name}: weightpool_storage exactly where {storage_dir} is mounted"
        )
        offered |= set(resources)
    assert offered == POOL_RESOURCES


@pytest.mark.parametrize("which", ["RayCluster", "RayService"])
def test_tier_capacities_fit_the_pods_that_host_them(which: str) -> None:
    config = pool_config()
    for name, group in groups(dict(cluster_specs())[which]):
        memory = quantity_bytes(containers(group)[0]["resources"]["limits"]["memory"])
        for resource, capacity in [("host", "host_bytes"), ("cxl", "cxl_bytes")]:
            if f"weightpool_{resource}" in custom_resources(group):
                assert config[capacity] < memory, f"{name}: {capacity} over the pod's memory"


def test_the_storage_volume_is_mounted_at_the_pools_storage_dir() -> None:
    claim = one("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "weightpool-store"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    storage_dir = pool_config()["storage_dir"]
    assert storage_dir == "/mnt/weightpool/store"
    for which, spec in cluster_specs():
        for name, group in groups(spec):
            pod = group["template"]["spec"]
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            assert set(claims.values()) <= {"weightpool-store"}, (which, name, claims)
            for mount in containers(group)[0].get("volumeMounts", []):
                if mount["name"] in claims:
                    assert mount["mountPath"] == storage_dir, (which, name, mount)
        head_mounts = {m["mountPath"] for m in containers(spec["headGroupSpec"])[0]["volumeMounts"]}
        assert storage_dir in head_mounts, which


def test_the_pool_config_suits_the_cluster() -> None:
    from policy.config import PolicyConfig

    config = pool_config()
    assert config["namespace"] == "weightpool"
    # Nodes without GPUs (the head, the CXL worker) must not get CPU stand-ins for HBM.
    assert config["emulated_devices_per_node"] == 0
    for key in ["hbm_bytes_per_device", "host_bytes", "cxl_bytes"]:
        assert type(config[key]) is int and config[key] > 0, key
    PolicyConfig(**config["policy"])  # raises, naming the field, on a bad policy value


def test_the_runtime_accepts_the_pool_config(tmp_path: Path) -> None:
    runtime = pytest.importorskip("actors.config", reason="the pool runtime is not built yet")
    path = tmp_path / "pool.yaml"
    path.write_text(one("ConfigMap")["data"]["pool.yaml"])
    loaded = runtime.load_config(path)  # raises ConfigError naming an unknown key or bad value
    assert (loaded.namespace, loaded.storage_dir) == ("weightpool", "/mnt/weightpool/store")
    assert loaded.cxl_bytes == pool_config()["cxl_bytes"]


def test_the_head_starts_the_pool_from_the_configmap() -> None:
    config_path = PurePosixPath(START_COMMAND.split("--config ")[1])
    for which, spec in cluster_specs():
        head = spec["headGroupSpec"]
        command = " ".join(containers(head)[0]["lifecycle"]["postStart"]["exec"]["command"])
        assert START_COMMAND in command, which
        volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
        (mount,) = [
            m
            for m in containers(head)[0]["volumeMounts"]
            if m["mountPath"] == str(config_path.parent)
        ]
        assert volumes[mount["name"]]["configMap"]["name"] == "weightpool-config", which
    assert config_path.name in one("ConfigMap")["data"]


def test_the_serve_config_names_the_pools_applications() -> None:
    serve = yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])
    # Serve, too, ignores keys it does not know: the few these apps use are listed.
    assert set(serve) <= {"http_options", "applications"}
    apps = {a["name"]: a for a in serve["applications"]}
    for app in apps.values():
        assert set(app) <= {"name", "import_path", "route_prefix", "deployments"}, app["name"]
        for deployment in app.get("deployments", []):
            assert set(deployment) <= {"name", "num_replicas", "ray_actor_options"}, deployment
    assert {n: (a["import_path"], a["route_prefix"]) for n, a in apps.items()} == SERVE_APPS
    embed = apps["weightpool-embed"]["deployments"]
    assert embed and all(d["ray_actor_options"]["num_gpus"] == 1 for d in embed)
    spec = one("RayService")["spec"]["rayClusterConfig"]
    gpus = sum(
        int(containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
        for _, g in groups(spec)
        if "replicas" in g
    )
    assert sum(d["num_replicas"] for d in embed) <= gpus
    serve_module = ROOT / "api" / "serve.py"
    if serve_module.exists():  # the manifests and the code must agree on the names
        source = serve_module.read_text()
        for name in ["admin_app", "embed_app", *(d["name"] for d in embed)]:
            assert name in source, f"{name} not found in {serve_module}"


def test_every_ray_container_takes_the_admin_token_from_the_secret() -> None:
    for which, spec in cluster_specs():
        for name, group in groups(spec):
            for container in containers(group):
                env = {e["name"]: e for e in container.get("env", [])}
                token = env["WEIGHTPOOL_ADMIN_TOKEN"]
                assert "value" not in token, (which, name)
                ref = token["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "weightpool-admin-token", "key": "token"}, (which, name)


def test_images_versions_and_resources_agree() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    base = re.search(r"^FROM rayproject/ray:(\S+)-py311", (K8S / "Dockerfile").read_text(), re.M)
    for which, spec in cluster_specs():
        assert spec["rayVersion"] == base.group(1), which
        for name, group in groups(spec):
            for container in containers(group):
                assert container["image"] == f"weightpool:{version}", (which, name)
                requests, limits = (
                    container["resources"]["requests"],
                    container["resources"]["limits"],
                )
                assert {"cpu", "memory"} <= set(limits), (which, name)
                assert requests == limits, f"{which} {name}: requests == limits (Guaranteed QoS)"
            if "replicas" in group:
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
