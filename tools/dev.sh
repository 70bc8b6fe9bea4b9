#!/usr/bin/env bash
# Bootstrap and run: creates ./.venv on first use, installs the project, then
#   tools/dev.sh serve [serve flags]   run the service (default: BioCLIP, gRPC port 50051,
#                                      web page and JSON API on 8080; --no-http turns it off)
#   tools/dev.sh serve --gallery milvus-server[?opts] ...
#                                      the same on a local Milvus server started for it
#                                      (data in data/milvus-server, stopped on exit)
#   tools/dev.sh smoke                 run the service on a random demo model (no download)
#   tools/dev.sh test [pytest args]    run the test suite
# TORCH_SPEC overrides the torch wheels (the default ones are on the CI machines' disk).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BIOLIT_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HTTP_PORT=${BIOLIT_HTTP_PORT:-8080}  # serve/smoke: a later --http-port N or --no-http wins

ensure_env() {  # $1: pip extras, e.g. "dev,onnx"
    local extras=$1 stamp
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
        echo "installing $TORCH_SPEC (first run only)..." >&2
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install -q --disable-pip-version-check $TORCH_SPEC
    fi
    stamp="$VENV/.biolit-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
    if [ ! -e "$stamp" ]; then
        echo "installing biolit-id${extras:+[$extras]}..." >&2
        "$VENV/bin/pip" install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
        touch "$stamp"
    fi
}

ensure_chromium() {  # the browser tests drive the OS's Chromium through Playwright
    command -v chromium >/dev/null 2>&1 && return
    local sudo; sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    echo "installing chromium (first run only)..." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

command=${1:-}
shift || true
case "$command" in
    serve)
        args=() milvus_opts="" want_server=""
        while [ $# -gt 0 ]; do
            case "$1" in
                --gallery=milvus-server*) want_server=1; milvus_opts=${1#--gallery=milvus-server} ;;
                --gallery) if [[ "${2:-}" == milvus-server* ]]; then
                               want_server=1; milvus_opts=${2#milvus-server}; shift
                           else args+=("$1"); fi ;;
                *) args+=("$1") ;;
            esac
            shift
        done
        if [ -z "$want_server" ]; then
            ensure_env "onnx,openvino"  # --runtime auto picks the fastest that passes the gate
            exec "$VENV/bin/biolit-id" serve --http-port "$HTTP_PORT" "${args[@]}"
        fi
        ensure_env "onnx,openvino,milvus-server"
        mkdir -p data
        coproc MILVUS { exec "$VENV/bin/python" -u -m biolit_id.index.milvus.server \
            --base-dir data/milvus-server --port "${BIOLIT_MILVUS_PORT:-19530}"; }
        trap 'kill "$MILVUS_PID" 2>/dev/null; wait "$MILVUS_PID" 2>/dev/null' EXIT
        read -r -u "${MILVUS[0]}" milvus_line || { echo "Milvus did not start" >&2; exit 1; }
        echo "$milvus_line" >&2
        "$VENV/bin/biolit-id" serve --http-port "$HTTP_PORT" \
            --gallery "${milvus_line%% *}/biolit${milvus_opts}" "${args[@]}" ;;
    smoke)
        ensure_env "onnx,openvino"
        [ -d data/demo-model ] || "$VENV/bin/biolit-id" demo-model data/demo-model
        exec "$VENV/bin/biolit-id" serve --model local-dir:data/demo-model \
            --http-port "$HTTP_PORT" "$@" ;;
    test)
        ensure_env "dev,onnx,openvino,milvus,milvus-server"  # server variants of the Milvus tests
        ensure_chromium
        exec "$VENV/bin/pytest" -q "$@" ;;
    *)
        sed -n '2,6p' "$0" >&2
        exit 2 ;;
esac
