#!/usr/bin/env bash
# Credentials for the cluster's MLflow server (MLflow's basic-auth app), made once on the
# machine you run `ray up` from; ray_cluster.yaml file-mounts ~/.vgg to every node.
# Nothing here is committed: the files live in ~/.vgg, readable by you alone.
#   ~/.vgg/mlflow-auth.ini  the server's auth config (admin user, its users database)
#   ~/.vgg/mlflow.env       what every node exports: the client's user and password, and
#                           the server's Flask secret key
set -euo pipefail
dir="$HOME/.vgg"
if [ -e "$dir/mlflow.env" ] && [ "${1:-}" != "--force" ]; then
    echo "$dir/mlflow.env exists (use --force to make new credentials)"; exit 0
fi
mkdir -p "$dir" && chmod 700 "$dir"
password=$(python3 -c "import secrets; print(secrets.token_urlsafe(24))")
secret=$(python3 -c "import secrets; print(secrets.token_hex(32))")
umask 077
cat > "$dir/mlflow-auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:////mnt/vgg/mlflow/basic_auth.db
admin_username = vgg
admin_password = $password
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
cat > "$dir/mlflow.env" <<ENV
export MLFLOW_TRACKING_USERNAME=vgg
export MLFLOW_TRACKING_PASSWORD=$password
export MLFLOW_FLASK_SERVER_SECRET_KEY=$secret
export MLFLOW_AUTH_CONFIG_PATH=\$HOME/.vgg/mlflow-auth.ini
ENV
echo "wrote $dir/mlflow-auth.ini and $dir/mlflow.env (user vgg; the password is in mlflow.env)"
