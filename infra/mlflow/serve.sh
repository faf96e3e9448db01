#!/usr/bin/env bash
# Shared MLflow tracking server: a database backend store + a proxied artifact store.
#
#   bash infra/mlflow/serve.sh                                   # sqlite + local dir, 127.0.0.1:5000
#   BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   ARTIFACTS_DESTINATION=s3://my-bucket/mlflow \
#   HOST=0.0.0.0 ALLOWED_HOSTS=mlflow-host,mlflow-host:5000 bash infra/mlflow/serve.sh
#
# Clients (training on any node):  export MLFLOW_TRACKING_URI=http://mlflow-host:5000
# Extra arguments are passed to `mlflow server`.
#
# Environment:
#   HOST                   bind address (default 127.0.0.1 = this machine only)
#   PORT                   default 5000
#   MLFLOW_DIR             base dir for the defaults below (default ./mlflow-server)
#   BACKEND_STORE_URI      runs/params/metrics DB (default sqlite:///$MLFLOW_DIR/mlflow.db);
#                          PostgreSQL needs `pip install psycopg2-binary`
#   ARTIFACTS_DESTINATION  where artifacts are stored; clients upload through the server
#                          (default $MLFLOW_DIR/artifacts; s3:// needs boto3 and AWS creds
#                          on the server, gs:// google-cloud-storage)
#   WORKERS                server worker processes (default 2)
#   ALLOWED_HOSTS          Host headers accepted besides localhost/private IPs, e.g. the
#                          DNS name clients use (mlflow.default.svc.cluster.local:5000)
#
# The server has NO authentication. Binding to anything but localhost exposes every run
# and artifact (read and write) to whoever can reach the port: keep it on a trusted
# network, or put it behind an authenticating reverse proxy (TLS + auth), or start it with
# `--app-name basic-auth` (MLflow's built-in basic auth).
set -euo pipefail

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
MLFLOW_DIR="${MLFLOW_DIR:-$PWD/mlflow-server}"
case "$MLFLOW_DIR" in /*) ;; *) MLFLOW_DIR="$PWD/$MLFLOW_DIR" ;; esac
BACKEND_STORE_URI="${BACKEND_STORE_URI:-sqlite:///$MLFLOW_DIR/mlflow.db}"
ARTIFACTS_DESTINATION="${ARTIFACTS_DESTINATION:-$MLFLOW_DIR/artifacts}"
WORKERS="${WORKERS:-2}"
ALLOWED_HOSTS="${ALLOWED_HOSTS:-}"

if [[ "$BACKEND_STORE_URI" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${BACKEND_STORE_URI#sqlite:///}")"
fi
if [[ "$ARTIFACTS_DESTINATION" != *://* ]]; then   # plain path: make it absolute
  mkdir -p "$ARTIFACTS_DESTINATION"
  ARTIFACTS_DESTINATION="$(cd "$ARTIFACTS_DESTINATION" && pwd)"
fi

case "$HOST" in
  127.0.0.1 | localhost | ::1) ;;
  *) echo "serve.sh: WARNING: binding to $HOST without authentication; anyone who can reach" \
          "port $PORT can read and modify all runs. Use a trusted network, an authenticating" \
          "proxy, or --app-name basic-auth." >&2 ;;
esac

args=(server
  --backend-store-uri "$BACKEND_STORE_URI"
  --serve-artifacts --artifacts-destination "$ARTIFACTS_DESTINATION"
  --host "$HOST" --port "$PORT" --workers "$WORKERS")
if [[ -n "$ALLOWED_HOSTS" ]]; then
  args+=(--allowed-hosts "$ALLOWED_HOSTS")
fi

echo "serve.sh: MLflow at http://$HOST:$PORT (backend $BACKEND_STORE_URI, artifacts $ARTIFACTS_DESTINATION)" >&2
exec mlflow "${args[@]}" "$@"
