"""deploy/k8s: well-formed objects whose names, labels, ports, paths and timings agree with each
other and with the code (config loader, CLI, the server's default port, the image's user)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

import prefixlb
from prefixlb.cli import build_parser
from prefixlb.config import Config, load_config, parse_config

from .support import K8S, load_yaml_docs, one, resolve

NAMESPACED = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
              "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"}
API_VERSIONS = {
    "Namespace": "v1", "ServiceAccount": "v1", "ConfigMap": "v1", "Service": "v1",
    "Deployment": "apps/v1", "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- the objects ---------------------------------------------------------------------------------


def test_every_manifest_object_has_api_version_kind_and_a_valid_name(k8s_objects, kustomization):
    seen = set()
    for path, obj in k8s_objects:
        kind = obj.get("kind")
        assert kind in API_VERSIONS, f"{path.name}: unexpected kind {kind!r}"
        assert obj.get("apiVersion") == API_VERSIONS[kind], f"{path.name}: {kind} apiVersion"
        name = obj.get("metadata", {}).get("name")
        assert name and len(name) <= 63 and DNS_LABEL.match(name), f"{path.name}: {kind} name {name!r}"
        if kind in NAMESPACED:
            assert obj["metadata"].get("namespace") == kustomization["namespace"], f"{path.name}: {kind}/{name}"
        assert (kind, name) not in seen, f"{kind}/{name} defined twice"
        seen.add((kind, name))
    assert {k for k, _ in seen} == set(API_VERSIONS), "a kind the issue asks for is missing"


def test_kustomization_lists_every_manifest_file_and_nothing_else(kustomization):
    present = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == present
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"


def test_namespace_manifest_names_the_kustomization_namespace(k8s, kustomization):
    assert one(k8s, "Namespace")["metadata"]["name"] == kustomization["namespace"]


# -- the config ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(k8s) -> dict:
    return one(k8s, "Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def config(k8s, container, deployment, tmp_path_factory) -> Config:
    """The ConfigMap's balancer config, loaded from the path the container reads it at."""
    ns = build_parser().parse_args(container["args"])
    mount = next(m for m in container["volumeMounts"] if ns.config.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = one(k8s, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    key = ns.config[len(mount["mountPath"].rstrip("/")) + 1:]
    assert key in cm["data"], f"the container reads {ns.config}, the ConfigMap has {sorted(cm['data'])}"
    path = tmp_path_factory.mktemp("cm") / key
    path.write_text(cm["data"][key])
    return load_config(path)


def test_configmap_config_loads_with_the_balancers_loader(config, k8s):
    cm = one(k8s, "ConfigMap")
    for key, text in cm["data"].items():
        parse_config(yaml.safe_load(text), key)  # raises ConfigError naming the key
    assert config.host == "0.0.0.0", "in a pod the balancer must listen on every interface"
    assert config.tiers and all(t.replicas for t in config.tiers)


# -- the Deployment ------------------------------------------------------------------------------


def test_deployment_selector_matches_its_pod_labels(deployment):
    spec = deployment["spec"]
    assert matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    assert spec["replicas"] >= 2
    for c in spec["template"]["spec"].get("topologySpreadConstraints", []):
        assert c["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_container_runs_the_serve_command_with_real_flags(container):
    ns = build_parser().parse_args(container["args"])  # SystemExit on an unknown flag
    assert ns.command == "serve"
    assert "command" not in container, "keep the image's ENTRYPOINT (prefixlb)"


def test_image_tag_is_the_package_version(container, kustomization):
    name, _, tag = container["image"].rpartition(":")
    assert tag == prefixlb.__version__
    (image,) = [i for i in kustomization.get("images", []) if i["name"] == name]
    assert image["newTag"] == prefixlb.__version__


def test_container_port_is_the_configured_listen_port(container, config):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.port}
    assert Config.port == config.port == 8000, "the manifests follow the code's default port"


def test_pod_is_non_root_with_the_images_uid_and_a_read_only_root(deployment, container, dockerfile):
    pod = deployment["spec"]["template"]["spec"]
    psc, csc = pod["securityContext"], container["securityContext"]
    image_user = resolve(dockerfile.final, dockerfile.final.last("USER").args).split(":")[0]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == int(image_user) != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc.get("privileged", False) is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts, "a writable /tmp under a read-only root"


def test_container_has_resource_requests_and_a_memory_limit(container):
    res = container["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]), "the HPA's CPU utilisation needs a CPU request"
    assert "memory" in res["limits"]


def test_admin_token_comes_from_a_secret_in_the_variable_the_cli_reads(container, k8s):
    env = {e["name"]: e for e in container["env"]}
    ref = env["PREFIXLB_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert "value" not in env["PREFIXLB_ADMIN_TOKEN"], "never a literal token in a manifest"
    # prefixlb serve reads PREFIXLB_ADMIN_TOKEN (cli.py); the config names the same variable
    for text in one(k8s, "ConfigMap")["data"].values():
        admin = yaml.safe_load(text).get("admin") or {}
        assert "token" not in admin, "no token in a ConfigMap"
        assert admin.get("token_env", "PREFIXLB_ADMIN_TOKEN") == "PREFIXLB_ADMIN_TOKEN"


def test_termination_grace_covers_pre_stop_sleep_and_the_drain_timeout(deployment, container, config):
    pod = deployment["spec"]["template"]["spec"]
    cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep" and len(cmd) == 2, "preStop: sleep N, so endpoints update before SIGTERM"
    sleep_s = float(cmd[1])
    assert 3 <= sleep_s <= 30
    assert pod["terminationGracePeriodSeconds"] > sleep_s + config.drain_timeout_s


def test_probes_target_the_named_http_port(container):
    for probe in ("readinessProbe", "livenessProbe"):
        p = container[probe]
        action = p.get("httpGet") or p.get("tcpSocket")
        assert action and action["port"] in ("http", container["ports"][0]["containerPort"]), probe
        assert p.get("timeoutSeconds", 1) < p.get("periodSeconds", 10), probe
    assert container["readinessProbe"]["httpGet"]["path"].startswith("/")


def test_pod_uses_the_service_account_bound_to_the_discovery_role(deployment, k8s):
    pod = deployment["spec"]["template"]["spec"]
    sa = one(k8s, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True)) is True


# -- Service, PDB, HPA, ServiceMonitor ---------------------------------------------------------------


def test_service_selects_the_pods_and_targets_the_listen_port(k8s, deployment, container, config):
    svc = one(k8s, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(svc["spec"]["selector"], pod_labels)
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        resolved = by_name[target] if isinstance(target, str) else target
        assert resolved in by_name.values(), f"targetPort {target!r} is no containerPort"
        assert resolved == config.port


def test_pdb_selects_the_pods_and_still_allows_an_eviction(k8s, deployment):
    pdb = one(k8s, "PodDisruptionBudget")
    hpa = one(k8s, "HorizontalPodAutoscaler")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    spec = pdb["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    low = min(deployment["spec"]["replicas"], hpa["spec"]["minReplicas"])
    if "maxUnavailable" in spec:
        assert 1 <= spec["maxUnavailable"] < low
    else:
        assert spec["minAvailable"] < low, "a PDB that allows no disruption blocks node drains"


def test_hpa_scales_the_deployment_on_cpu(k8s, deployment):
    hpa = one(k8s, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100


def test_service_monitor_scrapes_the_services_metrics_port(k8s, kustomization):
    sm = one(k8s, "ServiceMonitor")
    svc = one(k8s, "Service")
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert kustomization["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in port_names
    assert ep["path"] == "/metrics"


# -- RBAC ----------------------------------------------------------------------------------------


def test_role_grants_exactly_the_read_access_discovery_needs(k8s):
    role = one(k8s, "Role")
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames")
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                grants.setdefault((group, res), set()).update(rule["verbs"])
    assert grants == {("", "pods"): {"get", "list", "watch"},
                      ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"}}


def test_role_binding_binds_the_role_to_the_service_account(k8s):
    rb, role, sa = one(k8s, "RoleBinding"), one(k8s, "Role"), one(k8s, "ServiceAccount")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in rb["subjects"]


# -- labels everywhere ---------------------------------------------------------------------------


def test_every_object_carries_the_app_labels(k8s_objects, deployment):
    selector = deployment["spec"]["selector"]["matchLabels"]
    for path, obj in k8s_objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "prefixlb", f"{path.name}: {obj['kind']}"
        if obj["kind"] != "Namespace":
            assert matches(selector, labels), f"{path.name}: {obj['kind']} lacks the app labels"


# -- optional: kustomize renders it ----------------------------------------------------------------


def test_kustomize_renders_every_object_with_the_namespace_and_image():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    files = [d for p in sorted(K8S.glob("*.y*ml")) if p.name != "kustomization.yaml" for d in load_yaml_docs(p)]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in files)
    (dep,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":" + prefixlb.__version__)
