#!/usr/bin/env bash
# Random passwords for every ACL user, written where the deployment files read them:
#   deploy/secrets/users.acl        broker_config/users.acl with each `>change-me-<role>` replaced (the broker
#                                   reads it at /etc/cosine/users.acl: compose mounts it there; systemd: install it)
#   deploy/secrets/<role>.env       COSINE_REDIS_PASSWORD=... for that role (compose env_file; systemd's
#                                   /etc/cosine/<role>.env)
#   deploy/secrets/passwords.env    <role>=<password> lines, for Kubernetes:
#                                   kubectl -n cosine create secret generic cosine-redis-passwords \
#                                     --from-env-file=deploy/secrets/passwords.env
# Nothing is printed; deploy/secrets/ is git-ignored. Refuses to overwrite an existing deploy/secrets/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/secrets}"
[ -e "$out" ] && { echo "$out exists; move it away first" >&2; exit 1; }
umask 077
mkdir -p "$out"
acl="$(cat "$here/../broker_config/users.acl")"
: > "$out/passwords.env"
for role in verifier drafter controller producer dashboard celery maintenance admin; do
  pw="$(openssl rand -hex 32)"
  acl="${acl//>change-me-$role />$pw }"
  printf 'COSINE_REDIS_PASSWORD=%s\n' "$pw" > "$out/$role.env"
  printf '%s=%s\n' "$role" "$pw" >> "$out/passwords.env"
done
if grep -q 'change-me-' <<<"$acl"; then
  echo "a user in broker_config/users.acl kept its placeholder password" >&2; exit 1
fi
printf '%s\n' "$acl" > "$out/users.acl"
echo "wrote $out (users.acl, <role>.env, passwords.env)"
