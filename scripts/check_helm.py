#!/usr/bin/env python3
"""Checks the keygate Helm chart with no cluster and no helm binary.

1. `helm lint --strict` (through helm-python-sdk, Helm's own Go code) with the
   default values and with every helm/keygate/ci/*-values.yaml: no warning
   or error.
2. Renders the chart with each of those value sets and validates every
   manifest against the Kubernetes JSON schemas of KUBE_VERSION in strict mode
   (kubernetes-validate: unknown fields, wrong types and missing required
   fields fail). kubernetes-validate knows only built-in kinds; for the one
   CRD kind the chart renders, ServiceMonitor, it raises SchemaNotFoundError,
   so that kind gets a smaller explicit structural check instead, and the
   output says so.
3. Asserts what an operator relies on, on the rendered output: replicas,
   gRPC probes, the security context, the database URL only ever coming from
   a Secret, the policy checksum rolling pods, TLS wiring, and that bad value
   combinations fail to render with a clear message.

Usage: scripts/check_helm.py [CHART_DIR]   (default helm/keygate)
Exits 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover
    tomllib = None

REPO = Path(__file__).resolve().parent.parent
KUBE_VERSION = "1.30"
RELEASE = "keygate"
NAMESPACE = "keygate"
# Kinds from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

failures: list[str] = []
# The value set being checked, named in every failure.
context = ""


def fail(message: str) -> None:
    failures.append(message)
    print(f"  FAIL [{context}] {message}" if context else f"  FAIL {message}")


def check(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def lint(chart: Path, values: dict[str, Any] | None) -> None:
    report = helm.lint(chart, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    messages = report.get("messages") or []
    for message in messages:
        severity = message.get("severity", 0)
        where = f"{message.get('path', '?')}: {message.get('error', '')}"
        if severity >= 2:
            level = "WARNING" if severity == 2 else "ERROR"
            fail(f"helm lint {level} {where}")
        else:
            print(f"  lint INFO {where}")
    # "errors" repeats the messages' texts; report only what it adds.
    reported = {m.get("error") for m in messages}
    for error in report.get("errors") or []:
        if error not in reported:
            fail(f"helm lint {error}")


def render(chart: Path, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every object the chart renders, hooks included, each tagged with its template."""
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                fail(f"{template}: a document that is not a mapping")
                continue
            doc["__template"] = template
            objects.append(doc)
    return objects


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "__template"}


def validate_service_monitor(obj: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """What we can check without the CRD's schema: the fields Prometheus
    Operator requires, and that the monitor actually selects our Service."""
    name = obj.get("metadata", {}).get("name")
    spec = obj.get("spec") or {}
    check(set(strip(obj)) <= {"apiVersion", "kind", "metadata", "spec"}, f"ServiceMonitor {name}: unknown top-level fields")
    check(bool(obj.get("metadata", {}).get("namespace")), f"ServiceMonitor {name}: no namespace")
    known = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
    check(set(spec) <= known, f"ServiceMonitor {name}: unknown spec fields {sorted(set(spec) - known)}")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    check(bool(selector), f"ServiceMonitor {name}: spec.selector.matchLabels is empty")
    endpoints = spec.get("endpoints")
    check(isinstance(endpoints, list) and bool(endpoints), f"ServiceMonitor {name}: spec.endpoints is empty")
    services = [
        o for o in objects
        if o["kind"] == "Service" and selector.items() <= (o["metadata"].get("labels") or {}).items()
    ]
    check(len(services) == 1, f"ServiceMonitor {name}: selects {len(services)} Services, expected 1")
    port_names = {p.get("name") for s in services for p in s["spec"].get("ports", [])}
    endpoint_keys = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings", "tlsConfig"}
    for endpoint in endpoints or []:
        check(set(endpoint) <= endpoint_keys, f"ServiceMonitor {name}: unknown endpoint fields {sorted(set(endpoint) - endpoint_keys)}")
        check(endpoint.get("port") in port_names, f"ServiceMonitor {name}: endpoint port {endpoint.get('port')!r} is not a port of the Service")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                check(str(endpoint[key])[-1:] in "smh" and str(endpoint[key])[:-1].isdigit(), f"ServiceMonitor {name}: {key} {endpoint[key]!r} is not a duration")


def validate(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        where = f"{obj['__template']}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if not obj.get("apiVersion") or not obj.get("kind") or not obj.get("metadata", {}).get("name"):
            fail(f"{where}: missing apiVersion, kind or metadata.name")
            continue
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            print(f"  note {where}: a CRD kind, not in kubernetes-validate's schemas; checked structurally only")
            validate_service_monitor(obj, objects)
            continue
        try:
            kubernetes_validate.validate(strip(obj), KUBE_VERSION, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(f"{where}: invalid for Kubernetes {KUBE_VERSION}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            fail(f"{where}: {e.message} (a CRD kind? add it to CRD_KINDS with a structural check)")


def find(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)
    ]


def the(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, component)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}{f' ({component})' if component else ''}, rendered {len(found)}")
    return found[0]


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "keygate")


def assert_database_url_from_secret(objects: list[dict[str, Any]], secret: str, key: str) -> None:
    for obj in find(objects, "Deployment") + find(objects, "Job"):
        pod = obj["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            url = env.get("KEYGATE_DATABASE_URL")
            where = f"{obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            check(url is not None, f"{where}: no KEYGATE_DATABASE_URL")
            if url is None:
                continue
            ref = (url.get("valueFrom") or {}).get("secretKeyRef") or {}
            check("value" not in url and bool(ref), f"{where}: KEYGATE_DATABASE_URL is not from a secretKeyRef")
            if obj["kind"] == "Deployment":
                check(ref.get("name") == secret and ref.get("key") == key,
                      f"{where}: KEYGATE_DATABASE_URL from {ref.get('name')}/{ref.get('key')}, expected {secret}/{key}")
            check("DATABASE_URL" not in env or "value" not in env["DATABASE_URL"], f"{where}: DATABASE_URL inline")
        # No database URL anywhere inline in the pod spec, Secrets aside.
        check("postgres://" not in yaml.safe_dump(pod), f"{obj['kind']}/{obj['metadata']['name']}: a postgres:// URL inline in the pod spec")


def assert_secure_pod(objects: list[dict[str, Any]]) -> None:
    for obj in find(objects, "Deployment") + find(objects, "Job"):
        pod = obj["spec"]["template"]["spec"]
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, f"{name}: pod not runAsNonRoot as 10001")
        for container in pod["containers"]:
            sc = container.get("securityContext", {})
            where = f"{name} container {container['name']}"
            check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
            check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem is not true")
            check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities do not drop ALL")
            check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile is not RuntimeDefault")
            check("limits" in container.get("resources", {}) and "requests" in container.get("resources", {}), f"{where}: no resource requests and limits")
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            check(len(tmp) == 1, f"{where}: no writable /tmp")
        tmp_volumes = [v for v in pod.get("volumes", []) if "emptyDir" in v]
        check(bool(tmp_volumes), f"{name}: /tmp is not an emptyDir")


def default_checks(chart: Path, objects: list[dict[str, Any]]) -> None:
    deployment = the(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(objects)
    check(deployment["spec"].get("replicas", 0) >= 2, "Deployment: fewer than 2 replicas by default")
    args = container.get("args", [])
    for flag in ("--listen=0.0.0.0:50051", "--metrics-addr=0.0.0.0:9090", "--policy=/etc/keygate/policy.toml", "--log-format=json"):
        check(flag in args, f"Deployment: serve args lack {flag}")
    check(args[:1] == ["serve"], "Deployment: the container does not run `keygate serve`")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe) or {}
        check(spec.get("grpc", {}).get("port") == 50051, f"Deployment: {probe} is not a native gRPC probe on 50051")
        # Liveness must not follow the store (a database outage would restart every replica).
        want = "liveness" if probe == "livenessProbe" else None
        check(spec.get("grpc", {}).get("service") == want, f"Deployment: {probe} asks health service {spec.get('grpc', {}).get('service')!r}, want {want!r}")
    grace = 20 + (container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))
    check(pod.get("terminationGracePeriodSeconds", 30) > grace,
          f"Deployment: terminationGracePeriodSeconds must exceed preStop sleep + --shutdown-grace ({grace}s)")
    assert_secure_pod(objects)

    # The release's own Secret; the migration Job's hook copy aside.
    secrets = [s for s in find(objects, "Secret") if "helm.sh/hook" not in (s["metadata"].get("annotations") or {})]
    check(len(secrets) == 1, f"expected one database Secret, rendered {len(secrets)}")
    secret = secrets[0]
    assert_database_url_from_secret(objects, secret["metadata"]["name"], "database-url")
    check("database-url" in secret.get("data", {}), "Secret: no database-url key")

    service = the(objects, "Service", "server")
    check(len(find(objects, "Service")) == 1, "Service: a console Service although console.enabled is false")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    check(ports.get("grpc", {}).get("port") == 50051 and ports["grpc"].get("appProtocol") == "grpc",
          "Service: no grpc port 50051 with appProtocol grpc")
    check(ports.get("metrics", {}).get("port") == 9090, "Service: no metrics port 9090")
    # The console is off unless asked for.
    check("console" not in ports, "Service: a console port although console.enabled is false")
    check(not any(a.startswith("--console-listen") for a in args), "Deployment: --console-listen by default")

    # The default policy mirrors policy.example.toml, and parses as keygate's TOML.
    configmap = the(objects, "ConfigMap")
    if tomllib is None:
        print("  note: Python < 3.11 has no tomllib; the default policy is not compared with policy.example.toml")
    else:
        policy = tomllib.loads(configmap["data"]["policy.toml"])
        example = tomllib.loads((REPO / "policy.example.toml").read_text())
        check(policy == example, "ConfigMap: the default policy differs from policy.example.toml")
        # jwtIssuers become [[jwt_issuer]] tables after the routes.
        issuer = {"issuer": "https://idp.example/r", "audience": "keygate",
                  "jwksUrl": "https://idp.example/r/certs", "usage": "admin", "system": True,
                  "algorithms": ["RS256", "EdDSA"], "maxLifetimeSeconds": 900,
                  "jwksCaFile": "/etc/keygate/idp-ca.pem"}
        with_issuer = the(render(chart, {"jwtIssuers": [issuer]}), "ConfigMap")
        tables = tomllib.loads(with_issuer["data"]["policy.toml"]).get("jwt_issuer", [])
        check(tables == [{"issuer": "https://idp.example/r", "audience": "keygate",
                          "jwks_url": "https://idp.example/r/certs", "usage": "admin", "system": True,
                          "algorithms": ["RS256", "EdDSA"], "max_lifetime_seconds": 900,
                          "jwks_ca_file": "/etc/keygate/idp-ca.pem"}]
              and tomllib.loads(with_issuer["data"]["policy.toml"])["route"] == example["route"],
              f"ConfigMap: jwtIssuers not rendered as [[jwt_issuer]] tables: {tables}")

    # A policy change changes the pod template, so the pods roll.
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    check("checksum/policy" in annotations, "Deployment: no checksum/policy annotation")
    changed = render(chart, {"policy": {"routes": '[[route]]\nroute = "GET /x"\nscope = "x:read"\n'}})
    changed_annotations = the(changed, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    check(changed_annotations.get("checksum/policy") != annotations.get("checksum/policy"),
          "Deployment: changing the policy does not change the pod template")

    pdb = the(objects, "PodDisruptionBudget")
    check(pdb["spec"].get("minAvailable") == 1, "PodDisruptionBudget: minAvailable is not 1")
    job = the(objects, "Job")
    hooks = job["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    check({"pre-install", "pre-upgrade"} <= set(hooks.split(",")), "Job: not a pre-install,pre-upgrade hook")
    check(job["spec"]["template"]["spec"]["containers"][0].get("args") == ["migrate"], "Job: does not run `keygate migrate`")


def all_on_checks(objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    kinds = {o["kind"] for o in objects}
    for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "Job"):
        check(kind in kinds, f"all-on: no {kind} rendered")
    deployment = the(objects, "Deployment")
    check("replicas" not in deployment["spec"], "all-on: Deployment sets replicas although the HPA owns them")
    container = server_container(objects)
    args = container.get("args", [])
    for flag in ("--tls-cert=/etc/keygate/tls/tls.crt", "--tls-key=/etc/keygate/tls/tls.key"):
        check(flag in args, f"all-on: serve args lack {flag}")
    check(any(a.startswith("--tls-client-ca=/etc/keygate/client-ca/") for a in args), "all-on: no --tls-client-ca")
    # kubelet's gRPC probes can't speak TLS: they ask the plaintext health-only port.
    check("--health-listen=0.0.0.0:50052" in args, "all-on: TLS without a plaintext health port for probes")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe) or {}
        check(spec.get("grpc", {}).get("port") == 50052, f"all-on: {probe} does not ask the health port under TLS")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    for path in ("/etc/keygate/tls", "/etc/keygate/client-ca"):
        check(mounts.get(path, {}).get("readOnly") is True, f"all-on: {path} is not mounted read-only")
    database = values["database"]
    assert_database_url_from_secret(objects, database["existingSecret"], database["existingSecretKey"])
    check(not find(objects, "Secret"), "all-on: the chart creates a Secret although database.existingSecret is set")
    # The Redis URL, like the database's, only ever comes from a Secret.
    env = {e["name"]: e for e in container.get("env", [])}
    redis = env.get("KEYGATE_RATE_LIMIT_STORE", {})
    ref = redis.get("valueFrom", {}).get("secretKeyRef", {})
    check(
        ref == {"name": "keygate-redis", "key": "url"} and "value" not in redis,
        f"all-on: KEYGATE_RATE_LIMIT_STORE is not read from its Secret: {redis}",
    )
    check(env.get("KEYGATE_RATE_LIMIT_STORE_FAILURE", {}).get("value") == "deny", "all-on: rate-limit store failure mode not passed")
    # The console on its own port, HTTPS under TLS.
    check("--console-listen=0.0.0.0:8080" in args, "all-on: no --console-listen")
    # On a Service of its own that keeps a client on one pod (sessions are
    # per pod), so the gRPC Service stays free of affinity.
    grpc_service = the(objects, "Service", "server")
    check("console" not in {p["name"] for p in grpc_service["spec"]["ports"]}, "all-on: the gRPC Service carries the console port")
    check(grpc_service["spec"].get("sessionAffinity", "None") == "None", "all-on: the gRPC Service has session affinity")
    console_service = the(objects, "Service", "console")
    check(console_service["spec"].get("sessionAffinity") == "ClientIP", "all-on: the console Service has no ClientIP affinity")
    check(console_service["spec"].get("selector") == grpc_service["spec"].get("selector"), "all-on: the console Service selects other pods")
    service_ports = {p["name"]: p for p in console_service["spec"]["ports"]}
    console = service_ports.get("console", {})
    check(console.get("port") == 8080 and console.get("targetPort") == "console" and console.get("appProtocol") == "https",
          f"all-on: no console Service port 8080 (https): {console}")
    assert_secure_pod(objects)


def minimal_checks(objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    kinds = {o["kind"] for o in objects}
    for kind in ("ConfigMap", "Job", "ServiceAccount", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"):
        check(kind not in kinds, f"minimal: {kind} rendered although switched off")
    container = server_container(objects)
    check(not any(a.startswith("--metrics-addr") for a in container.get("args", [])), "minimal: --metrics-addr although metrics are off")
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    policy = next(v for v in pod["volumes"] if v["name"] == "policy")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policy")
    check(policy["configMap"]["name"] == values["policy"]["existingConfigMap"]
          and mount.get("subPath") == values["policy"]["existingConfigMapKey"],
          "minimal: the policy does not come from policy.existingConfigMap")
    secret = the(objects, "Secret")
    assert_database_url_from_secret(objects, secret["metadata"]["name"], "database-url")
    assert_secure_pod(objects)


def render_must_fail(chart: Path, values: dict[str, Any], expect: str) -> None:
    try:
        render(chart, values)
    except helm.HelmRenderError as e:
        check(expect in str(e), f"rendering {values} failed, but without {expect!r}: {e}")
        return
    fail(f"rendering {values} should fail ({expect})")


def refused_values(chart: Path) -> None:
    """Combinations that would deploy something broken fail with a clear message."""
    render_must_fail(chart, {"tls": {"enabled": True}}, "tls.enabled needs tls.secretName")
    render_must_fail(chart, {"terminationGracePeriodSeconds": 20}, "terminationGracePeriodSeconds (20) must exceed")
    render_must_fail(chart, {"jwtIssuers": [{"issuer": "https://i", "audience": "k"}]}, "jwtIssuers[0].jwksUrl is required")
    render_must_fail(chart, {"database": {"url": ""}}, "database.existingSecret")
    render_must_fail(chart, {"keygate": {"shutdownGrace": "20 weeks"}}, "has an unknown unit")


def main() -> int:
    global context
    chart = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "helm" / "keygate"
    chart = chart.resolve()
    value_sets: list[tuple[str, dict[str, Any] | None]] = [("default values", None)]
    for path in sorted((chart / "ci").glob("*-values.yaml")):
        value_sets.append((str(path.relative_to(chart)), yaml.safe_load(path.read_text()) or {}))

    summary: list[str] = []
    for label, values in value_sets:
        print(f"== {label}")
        context = label
        lint(chart, values)
        try:
            objects = render(chart, copy.deepcopy(values))
        except helm.HelmChartLoadError as e:
            fail(f"the chart does not load: {e}")
            break
        except helm.HelmError as e:
            fail(f"rendering: {e}")
            continue
        validate(objects)
        try:
            if values is None:
                default_checks(chart, objects)
            elif label.endswith("all-on-values.yaml"):
                all_on_checks(objects, values)
            elif label.endswith("minimal-values.yaml"):
                minimal_checks(objects, values)
            else:
                assert_secure_pod(objects)
        except (AssertionError, KeyError, IndexError, StopIteration, TypeError) as e:
            fail(f"{type(e).__name__}: {e}")
        kinds = Counter(o["kind"] for o in objects)
        summary.append(f"{label} ({len(objects)} objects): " + ", ".join(f"{n}x {k}" if n > 1 else k for k, n in sorted(kinds.items())))
    else:
        print("== values the chart must refuse")
        context = "refused values"
        refused_values(chart)
    context = ""

    print(f"== rendered and validated against Kubernetes {KUBE_VERSION} (strict)")
    for line in summary:
        print(f"  {line}")
    if failures:
        print(f"check-helm: {len(failures)} failure(s)")
        return 1
    print("check-helm: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
