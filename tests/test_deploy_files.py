"""The deployment files under deploy/ against the code they start (fast; no Docker, no cluster, no Redis).

Every file under deploy/ is parsed (YAML, TOML, Dockerfiles, systemd units, env files, the scripts and the
README), and each of them is checked against what it names:

* every ``cosine ...`` command line (container commands and args, health checks and probes, ExecStart, RUN):
  its subcommands and ``--flags`` exist in the click tree of ``cosine.cli.cli``, with values a Choice or number
  option accepts;
* every ``COSINE_*`` variable anywhere in them is one the CLI reads: a click option's ``envvar``, one derived
  from ``auto_envvar_prefix`` the way click derives it, or one the package reads by name;
* every key of cosine.toml (and of the copy in the Kubernetes ConfigMap) is an option of its command;
* the ports of ``cosine serve`` / ``dashboard`` / ``metrics`` (their flag or their default) are the ports
  published, probed and served, and Redis URLs point at the broker's port and service;
* Redis is started with broker_config/redis.conf and its ACL file where the conf's ``aclfile`` says, from the
  shipped files (the Kubernetes copies are equal to them);
* every ACL user named exists in broker_config/users.acl, and each role connects as its own user;
* workers stop on SIGTERM with a grace above the verifier's drain timeout;
* the alert rules, and docs/operations.md, name only metrics documented in docs/metrics.md.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
from urllib.parse import urlsplit

import click
import pytest
import yaml  # PyYAML, a dependency of transformers

from cosine import defaults
from cosine.cli import cli

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BROKER = ROOT / "broker_config"
IGNORED = {"secrets", "models"}  # deploy/.gitignore: generated passwords, a local models folder

# The ACL user each command connects as (broker_config/README.md).
ROLE_USER = {
    ("worker", "verifier"): "cosine-verifier",
    ("worker", "drafter"): "cosine-drafter",
    ("controller",): "cosine-controller",
    ("serve",): "cosine-producer",
    ("dashboard",): "cosine-dashboard",
    ("metrics",): "cosine-dashboard",
    ("status",): "cosine-dashboard",
}
WORKERS = {("worker", "verifier"), ("worker", "drafter"), ("controller",)}
SERVERS = {("serve",), ("dashboard",), ("metrics",)}  # commands that listen on --port


# -- what the code accepts --------------------------------------------------------------------------------
def cli_envvars() -> set[str]:
    """Every environment variable the click tree reads: explicit ``envvar``s, and for every option the name
    ``auto_envvar_prefix`` gives it (click: the parent's prefix + ``_`` + the command's name, upper-cased, ``-``
    as ``_``; then ``_`` + the parameter's name upper-cased)."""
    names: set[str] = set()

    def walk(cmd: click.Command, prefix: str) -> None:
        for p in cmd.params:
            if isinstance(p, click.Option):
                if p.envvar:
                    names.update([p.envvar] if isinstance(p.envvar, str) else p.envvar)
                if p.allow_from_autoenv and p.name:
                    names.add(f"{prefix}_{p.name.upper()}")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{prefix}_{name.upper()}".replace("-", "_"))

    walk(cli, cli.context_settings["auto_envvar_prefix"].upper().replace("-", "_"))
    return names


def package_envvars() -> set[str]:
    """COSINE_* names the package reads itself (os.environ), as quoted literals in its source."""
    out: set[str] = set()
    for f in [*(ROOT / "cosine").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        out.update(re.findall(r"[\"'](COSINE_[A-Z0-9_]+)[\"']", f.read_text()))
    return out


KNOWN_ENV = cli_envvars() | package_envvars()


def acl_users() -> dict[str, str | None]:
    """users.acl's users with their clear-text password (None where it has none)."""
    out = {}
    for line in (BROKER / "users.acl").read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "user":
            out[words[1]] = next((w[1:] for w in words[2:] if w.startswith(">")), None)
    return out


def redis_conf(text: str | None = None) -> dict[str, str]:
    text = (BROKER / "redis.conf").read_text() if text is None else text
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


ACL_FILE = redis_conf()["aclfile"]
REDIS_PORT = int(redis_conf()["port"])
DRAIN_S = defaults.VERIFIER_DRAIN_TIMEOUT_S


def placeholder(value: str) -> bool:
    """A value filled in later: $(VAR), ${VAR}, $VAR, systemd's %i."""
    return "$" in value or "%" in value or "<" in value


def _options(cmd: click.Command) -> dict[str, click.Option | None]:
    out: dict[str, click.Option | None] = {o: None for o in ("-h", "--help")}
    for p in cmd.params:
        if isinstance(p, click.Option):
            out.update({o: p for o in [*p.opts, *p.secondary_opts]})
    return out


def _check_value(p: click.Option, value: str, where: str) -> None:
    if placeholder(value):
        return
    if isinstance(p.type, (click.Choice, click.IntRange, click.FloatRange)) or p.type in (click.INT, click.FLOAT):
        try:
            p.type.convert(value, p, None)
        except click.BadParameter as exc:
            raise AssertionError(f"{where}: {p.opts[0]} {value!r}: {exc.message}") from None


def parse_cosine(argv: list[str], where: str) -> tuple[tuple[str, ...], dict[str, str | bool]]:
    """``cosine ARGV`` against the click tree: (the command's path, {parameter name: value given}); asserts that
    every subcommand and option exists."""
    cmd: click.Command = cli
    path: tuple[str, ...] = ()
    given: dict[str, str | bool] = {}
    i = 0
    while True:
        opts = _options(cmd)
        while i < len(argv) and (argv[i].startswith("-") or not isinstance(cmd, click.Group)):
            tok = argv[i]
            i += 1
            if not tok.startswith("-"):
                continue  # an argument of the command (a prompt, ...)
            name, eq, value = tok.partition("=")
            assert name in opts, f"{where}: `cosine {' '.join(path)}` has no option {name}"
            p = opts[name]
            if p is None:
                continue
            if p.is_flag or p.count:
                given[p.name] = True
                continue
            if not eq:
                assert i < len(argv), f"{where}: {name} needs a value"
                value, i = argv[i], i + 1
            _check_value(p, value, where)
            given[p.name] = value
        if not isinstance(cmd, click.Group) or i >= len(argv):
            return path, given
        sub = argv[i]
        assert sub in cmd.commands, f"{where}: `cosine {' '.join(path)}` has no subcommand {sub!r}"
        cmd, path, i = cmd.commands[sub], path + (sub,), i + 1


def command_of(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = cli
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def listen_port(path: tuple[str, ...], given: dict) -> int:
    """The port a server command listens on: its --port, else the option's default."""
    if "port" in given:
        return int(given["port"])
    return next(p.default for p in command_of(path).params if p.name == "port")


def is_cosine(word: str) -> bool:
    return pathlib.PurePosixPath(word).name == "cosine"


def shell_cosine(line: str) -> list[list[str]]:
    """The cosine invocations of a shell line (segments joined by &&, ||, ;, |)."""
    out = []
    for segment in re.split(r"&&|\|\||;|\|", line):
        segment = re.split(r"\s\d*[<>]", segment)[0]  # no redirections
        try:
            words = shlex.split(segment)
        except ValueError:
            continue
        if words and is_cosine(words[0]):
            out.append(words[1:])
    return out


def duration_s(value) -> float:
    """A compose duration (30s, 1m30s, 10m) or seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unreadable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def deploy_files() -> list[pathlib.Path]:
    return sorted(p for p in DEPLOY.rglob("*")
                  if p.is_file() and not IGNORED & set(p.relative_to(DEPLOY).parts[:-1]))


def rel(p: pathlib.Path) -> str:
    return str(p.relative_to(ROOT))


# -- what the files say -----------------------------------------------------------------------------------
class Seen:
    """What the files name, gathered once: cosine command lines, environment variables set, ACL users."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[str, ...], dict]] = []
        self.env_set: list[tuple[str, str]] = []
        self.users: list[tuple[str, str]] = []

    def cosine(self, argv: list[str], where: str) -> tuple[tuple[str, ...], dict]:
        path, given = parse_cosine(argv, where)
        self.commands.append((where, path, given))
        if given.get("username"):
            self.users.append((where, str(given["username"])))
        return path, given

    def env(self, name: str, value, where: str) -> None:
        self.env_set.append((where, name))
        if name == "COSINE_REDIS_USERNAME" and value:
            self.users.append((where, str(value)))


def check_redis_url(url: str, where: str, hosts: dict[str, int] | None = None) -> None:
    if placeholder(url):
        return
    parts = urlsplit(url)
    assert parts.scheme in ("redis", "rediss", "unix"), f"{where}: {url}"
    if parts.username:
        assert parts.username in acl_users(), f"{where}: no ACL user {parts.username!r} in users.acl"
    assert parts.password is None, f"{where}: a password in a Redis URL ({url})"
    if hosts is not None:
        assert parts.hostname in hosts, f"{where}: Redis host {parts.hostname!r} is not the broker's service"
        assert (parts.port or 6379) == hosts[parts.hostname], f"{where}: Redis port {parts.port} is not the broker's"
    elif parts.scheme == "redis":
        assert (parts.port or 6379) == REDIS_PORT, f"{where}: port {parts.port} but redis.conf says {REDIS_PORT}"


def check_role_user(path: tuple[str, ...], user: str | None, where: str) -> None:
    if path in ROLE_USER:
        assert user == ROLE_USER[path], f"{where}: `cosine {' '.join(path)}` connects as {user!r}, not its own " \
                                        f"user {ROLE_USER[path]}"


def env_list(env) -> dict:
    if isinstance(env, dict):
        return env
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in env or [])


# compose ---------------------------------------------------------------------------------------------------
def check_compose(seen: Seen) -> None:
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    layers = [("compose.yaml", base["services"])]
    override = DEPLOY / "compose.gpu.yaml"
    if override.exists():
        extra = yaml.safe_load(override.read_text())["services"]
        assert set(extra) <= set(base["services"]), "compose.gpu.yaml overrides a service compose.yaml lacks"
        layers.append(("compose.gpu.yaml", {n: {**base["services"][n], **s} for n, s in extra.items()}))
    brokers = {n: REDIS_PORT for n, s in base["services"].items() if str(s.get("image", "")).startswith("redis:")}
    assert brokers, "compose.yaml runs no Redis"
    for n in brokers:
        check_compose_redis(base["services"][n])
    roles = set()
    for fname, services in layers:
        for name, svc in services.items():
            where = f"deploy/{fname}: {name}"
            if name in brokers:
                continue
            assert "build" in svc and str(svc.get("image", "")).startswith("cosine:"), f"{where}: not a cosine image"
            path, given = seen.cosine([str(a) for a in svc["command"]], where)
            env = env_list(svc.get("environment"))
            for k, v in env.items():
                seen.env(k, v, where)
            if "COSINE_REDIS_URL" in env:
                check_redis_url(env["COSINE_REDIS_URL"], where, brokers)
            user = env.get("COSINE_REDIS_USERNAME")
            check_role_user(path, user, where)
            roles.add(path)
            for f in svc.get("env_file", []):
                f = pathlib.PurePosixPath(f)
                assert f.parent.name == "secrets" and f.stem == str(user).removeprefix("cosine-"), \
                    f"{where}: env_file {f} is not secrets/<its role>.env"
            assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", where
            if path in WORKERS:
                assert duration_s(svc["stop_grace_period"]) > DRAIN_S, f"{where}: stop_grace_period under the drain"
            deps = svc.get("depends_on", {})
            assert all(d in services or d in base["services"] for d in deps), f"{where}: depends_on {deps}"
            assert any(d in brokers and c.get("condition") == "service_healthy" for d, c in deps.items()), \
                f"{where}: does not wait for a healthy Redis"
            test = [str(t) for t in svc["healthcheck"]["test"]]
            argvs = ([test[2:]] if is_cosine(test[1]) else []) if test[0] == "CMD" else shell_cosine(test[1])
            for argv in argvs:
                probe, probe_given = seen.cosine(argv, f"{where} healthcheck")
                if probe == ("worker-ready",):
                    assert probe_given.get("name") == given.get("name"), f"{where}: the probe asks for another worker"
            if path in SERVERS:
                port = listen_port(path, given)
                published = {int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])}
                assert port in published, f"{where}: listens on {port}, publishes {published}"
                urls = [int(m) for t in test for m in re.findall(r"127\.0\.0\.1:(\d+)/", t)]
                assert urls and set(urls) == {port}, f"{where}: health check on {urls}, listens on {port}"
    assert {("worker", "verifier"), ("worker", "drafter"), ("controller",), ("dashboard",), ("serve",)} <= roles


def check_compose_redis(svc: dict) -> None:
    argv = [str(a) for a in svc["command"]]
    assert argv[0] == "redis-server" and "--aclfile" not in argv, argv
    mounts = {}
    for v in svc["volumes"]:
        src, dst = v.split(":")[:2]
        mounts[dst] = src
    assert argv[1] in mounts and (DEPLOY / mounts[argv[1]]).resolve() == BROKER / "redis.conf", \
        f"compose.yaml: Redis's conf {argv[1]} is not broker_config/redis.conf"
    assert ACL_FILE in mounts and pathlib.PurePosixPath(mounts[ACL_FILE]).name == "users.acl", \
        f"compose.yaml: nothing mounted at {ACL_FILE}, where redis.conf reads its users"
    assert any(p.startswith("127.0.0.1:") or p.endswith(f":{REDIS_PORT}") for p in map(str, svc.get("ports", [])))


# kubernetes ------------------------------------------------------------------------------------------------
def k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        out += [(rel(f), d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def check_k8s(seen: Seen) -> None:
    docs = k8s_docs()
    by_kind: dict[str, dict[str, dict]] = {}
    for _, d in docs:
        if "kind" in d and "metadata" in d:
            by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                               if p.name != "kustomization.yaml"), "kustomization.yaml resources"
    services = by_kind.get("Service", {})
    secrets = by_kind.get("Secret", {})
    configmaps = by_kind.get("ConfigMap", {})
    redis_hosts = {n: p["port"] for n, s in services.items() for p in s["spec"].get("ports", [])
                   if p.get("name") == "redis"}
    assert redis_hosts, "deploy/k8s: no Service for Redis"
    pods = {}
    roles = set()
    for where, d in docs:
        if d.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        where = f"{where}: {d['kind']} {d['metadata']['name']}"
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{where}: selector"
        for c in spec["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            pods[d["metadata"]["name"]] = (labels, ports)
            if c["image"].startswith("redis:"):
                check_k8s_redis(c, spec, configmaps, secrets, where)
                continue
            assert c["image"].startswith("cosine:") and "command" not in c, f"{where}: not the cosine image entrypoint"
            path, given = seen.cosine([str(a) for a in c["args"]], where)
            roles.add(path)
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            user = env.get("COSINE_REDIS_USERNAME")
            for e in c.get("env", []):
                seen.env(e["name"], e.get("value"), where)
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["stringData"], \
                        f"{where}: {e['name']} from a secret key that does not exist ({ref})"
                    assert ref["key"] == str(user).removeprefix("cosine-"), \
                        f"{where}: {user} with {ref['key']}'s password"
            if "COSINE_REDIS_URL" in env:
                check_redis_url(env["COSINE_REDIS_URL"], where, redis_hosts)
            check_role_user(path, user, where)
            if path in WORKERS:
                assert spec["terminationGracePeriodSeconds"] > DRAIN_S, f"{where}: grace under the drain timeout"
                probe = c["readinessProbe"]["exec"]["command"]
                assert is_cosine(probe[0]), where
                ppath, _ = seen.cosine(probe[1:], f"{where} readinessProbe")
                assert ppath == ("worker-ready",)
                name_env = "COSINE_" + "_".join(path).upper() + "_NAME"
                assert {name_env, "COSINE_WORKER_READY_NAME"} <= set(env) or "name" in given, \
                    f"{where}: the worker and its probe are not given the same name"
                assert "nvidia.com/gpu" in c["resources"]["limits"] or path == ("controller",), where
                if path != ("controller",):
                    assert spec.get("nodeSelector"), f"{where}: a GPU worker without a nodeSelector"
            if path in SERVERS:
                port = listen_port(path, given)
                assert port in ports.values(), f"{where}: listens on {port}, declares {ports}"
                probe_port = c["readinessProbe"]["httpGet"]["port"]
                assert ports.get(probe_port, probe_port) == port, f"{where}: probes port {probe_port}"
                ann = d["spec"]["template"]["metadata"].get("annotations", {})
                if "prometheus.io/port" in ann:
                    assert int(ann["prometheus.io/port"]) == port, where
    for name, s in services.items():
        target = [(lab, ports) for lab, ports in pods.values() if s["spec"]["selector"].items() <= lab.items()]
        assert target, f"deploy/k8s: Service {name} selects no pod"
        for p in s["spec"].get("ports", []):
            t = p.get("targetPort", p["port"])
            assert any(t in ports or t in ports.values() for _, ports in target), f"Service {name}: targetPort {t}"
    check_k8s_secrets(secrets)
    toml_text = configmaps["cosine-config"]["data"]["cosine.toml"]
    assert toml_text == (DEPLOY / "cosine.toml").read_text(), "deploy/k8s/config.yaml: cosine.toml differs"
    assert {("worker", "verifier"), ("worker", "drafter"), ("controller",), ("dashboard",), ("serve",)} <= roles


def check_k8s_redis(c: dict, spec: dict, configmaps: dict, secrets: dict, where: str) -> None:
    argv = [str(a) for a in c["args"]]
    assert argv[0] == "redis-server" and "--aclfile" not in argv, argv
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    conf = mounts.get(argv[1])
    assert conf and conf.get("subPath") == "redis.conf", f"{where}: {argv[1]} is not mounted from redis.conf"
    cm = configmaps[volumes[conf["name"]]["configMap"]["name"]]["data"]["redis.conf"]
    assert redis_conf(cm) == redis_conf(), f"{where}: the ConfigMap's redis.conf differs from broker_config's"
    acl = mounts.get(ACL_FILE)
    assert acl and acl.get("subPath") == "users.acl", f"{where}: nothing mounted at {ACL_FILE}"
    text = secrets[volumes[acl["name"]]["secret"]["secretName"]]["stringData"]["users.acl"]
    assert text == (BROKER / "users.acl").read_text(), f"{where}: the Secret's users.acl differs from broker_config's"
    assert REDIS_PORT in [p["containerPort"] for p in c["ports"]], where


def check_k8s_secrets(secrets: dict) -> None:
    users = acl_users()
    for name, s in secrets.items():
        for key, value in s["stringData"].items():
            if key == "users.acl":
                continue
            user = f"cosine-{key}"
            assert user in users, f"deploy/k8s Secret {name}: no ACL user {user}"
            assert value == users[user], f"deploy/k8s Secret {name}: {key}'s placeholder is not users.acl's"


# systemd, Dockerfiles, env files, TOML ---------------------------------------------------------------------
def unit_entries(path: pathlib.Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def check_systemd(seen: Seen) -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert units
    for unit in units:
        where = rel(unit)
        entries = unit_entries(unit)
        env = {}
        for key, value in entries:
            if key == "Environment":
                for item in shlex.split(value):
                    k, _, v = item.partition("=")
                    env[k] = v
                    seen.env(k, v, where)
        argv = shlex.split(dict(entries)["ExecStart"])
        if pathlib.PurePosixPath(argv[0]).name == "redis-server":
            assert argv[1].endswith("/broker_config/redis.conf") and "--aclfile" not in argv, where
            continue
        assert is_cosine(argv[0]), f"{where}: ExecStart runs {argv[0]}"
        path, _ = seen.cosine(argv[1:], where)
        check_role_user(path, env.get("COSINE_REDIS_USERNAME"), where)
        role_files = [v for k, v in entries if k == "EnvironmentFile" and not v.endswith("/cosine.env")]
        assert [pathlib.PurePosixPath(f).stem for f in role_files] == [env["COSINE_REDIS_USERNAME"][len("cosine-"):]]
        assert dict(entries).get("KillSignal", "SIGTERM") == "SIGTERM", where
        if path in WORKERS:
            assert float(dict(entries)["TimeoutStopSec"]) > DRAIN_S, f"{where}: TimeoutStopSec under the drain"


def check_dockerfiles(seen: Seen) -> None:
    files = sorted((DEPLOY / "docker").glob("Dockerfile*"))
    assert {f.name for f in files} >= {"Dockerfile.cpu", "Dockerfile.cuda"}
    for f in files:
        where = rel(f)
        text = re.sub(r"\\\n", " ", f.read_text())
        instr = [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)
                 if not m.group(0).lstrip().startswith("#")]
        d = {k: v for k, v in instr}
        assert json.loads(d["ENTRYPOINT"]) == ["cosine"], f"{where}: ENTRYPOINT"
        seen.cosine(json.loads(d["CMD"]), f"{where} CMD")
        assert d["USER"].split(":")[0] not in ("root", "0"), f"{where}: runs as root"
        for k, v in instr:
            if k == "RUN":
                for argv in shell_cosine(v):
                    seen.cosine(argv, f"{where} RUN")
            if k == "ENV":
                for name in re.findall(r"(\w+)=", v):
                    seen.env(name, None, where)
            if k == "COPY":
                src = v.split()[0]
                assert (ROOT / src).exists(), f"{where}: COPY {src}: no such path in the repository"
            if k == "HEALTHCHECK" and v.strip() != "NONE":
                for argv in shell_cosine(v.split("CMD", 1)[1]):
                    seen.cosine(argv, f"{where} HEALTHCHECK")


def check_env_files(seen: Seen) -> None:
    for f in sorted(DEPLOY.glob("*.env*")):
        for line in f.read_text().splitlines():
            m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
            if m:
                seen.env(m.group(1), m.group(2), rel(f))
                if m.group(1) == "COSINE_REDIS_URL":
                    check_redis_url(m.group(2), rel(f))


def check_toml(text: str, where: str) -> None:
    def walk(cmd: click.Command, table: dict, path: tuple[str, ...]) -> None:
        names = {p.name for p in cmd.params}
        subs = getattr(cmd, "commands", {})
        for key, value in table.items():
            if isinstance(value, dict):
                assert key in subs, f"{where}: [{'.'.join((*path, key))}]: `cosine {' '.join(path)}` has no such " \
                                    f"subcommand"
                walk(subs[key], value, (*path, key))
            else:
                assert key.replace("-", "_") in names, f"{where}: `{key}` is no option of `cosine {' '.join(path)}`"

    walk(cli, tomllib.loads(text), ())


def check_make_secrets() -> None:
    """deploy/make-secrets.sh gives every user with a placeholder password a real one, and nothing else."""
    text = (DEPLOY / "make-secrets.sh").read_text()
    roles = re.search(r"for role in ([a-z ]+); do", text).group(1).split()
    placeholders = {u for u, pw in acl_users().items() if pw and pw.startswith("change-me-")}
    assert {f"cosine-{r}" for r in roles} == placeholders


# -- the tests --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seen() -> Seen:
    s = Seen()
    check_compose(s)
    check_k8s(s)
    check_systemd(s)
    check_dockerfiles(s)
    check_env_files(s)
    return s


def test_envvar_names_are_derived_the_way_click_derives_them():
    assert {"COSINE_REDIS_URL", "COSINE_REDIS_PASSWORD", "COSINE_LOG_LEVEL", "COSINE_CONFIG",
            "COSINE_WORKER_VERIFIER_NAME", "COSINE_WORKER_DRAFTER_BATCH_MAX", "COSINE_CONTROLLER_NAME",
            "COSINE_WORKER_READY_NAME", "COSINE_DASHBOARD_ADMIN_REDIS_URL"} <= KNOWN_ENV
    from click.testing import CliRunner

    @click.group(context_settings={"auto_envvar_prefix": "COSINE"})
    def top():
        pass

    @top.group("a-b")
    def ab():
        pass

    @ab.command("c-d")
    @click.option("--max-x", default=0)
    def cd(max_x):
        click.echo(f"x={max_x}")

    out = CliRunner().invoke(top, ["a-b", "c-d"], env={"COSINE_A_B_C_D_MAX_X": "7"})
    assert out.output == "x=7\n"
    saved = cli
    try:
        globals()["cli"] = top
        assert "COSINE_A_B_C_D_MAX_X" in cli_envvars()
    finally:
        globals()["cli"] = saved


def test_every_deploy_file_is_read_by_a_check():
    known = {"README.md", ".gitignore", "cosine.toml", "cosine.env.example", "grafana-cosine.json", "compose.yaml",
             "compose.gpu.yaml", "prometheus-alerts.yaml", "make-secrets.sh"}
    for f in deploy_files():
        r = f.relative_to(DEPLOY)
        assert (r.parts[0] in ("k8s", "systemd", "docker") or r.name in known), \
            f"deploy/{r}: a file no check reads (add it to tests/test_deploy_files.py)"
        if f.suffix == ".yaml":
            assert list(yaml.safe_load_all(f.read_text())), r
        if f.suffix == ".json":
            json.loads(f.read_text())
    assert (DEPLOY / ".gitignore").read_text().split() == ["secrets/", "models/"]


def test_every_cosine_command_line_exists_in_the_cli(seen):
    paths = {path for _, path, _ in seen.commands}
    assert {("worker", "verifier"), ("worker", "drafter"), ("controller",), ("serve",), ("dashboard",),
            ("worker-ready",)} <= paths


def test_every_cosine_variable_is_one_the_cli_reads(seen):
    unknown = [(w, n) for w, n in seen.env_set if n.startswith("COSINE_") and n not in KNOWN_ENV]
    assert not unknown, f"variables nothing reads: {unknown}"
    texts = [f for f in deploy_files() if f.suffix != ".json"] + [ROOT / "docs" / "operations.md"]
    for f in texts:
        for name in re.findall(r"\b(COSINE_[A-Z0-9_]*[A-Z0-9])\b", f.read_text()):
            assert name in KNOWN_ENV, f"{rel(f)}: {name} is read by nothing"


def test_cosine_toml_keys_are_options():
    check_toml((DEPLOY / "cosine.toml").read_text(), "deploy/cosine.toml")


def test_acl_users_exist_and_roles_use_their_own(seen):
    users = acl_users()
    named = seen.users + [(rel(f), u) for f in deploy_files() if f.suffix != ".json"
                          for u in re.findall(r"rediss?://([a-z0-9-]+)(?::[^@/\s]*)?@", f.read_text())]
    assert named
    assert all(u in users for _, u in named if not placeholder(u)), \
        [x for x in named if x[1] not in users and not placeholder(x[1])]
    check_make_secrets()


def test_prometheus_alerts_use_documented_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yaml").read_text())
    documented = set(re.findall(r"`(cosine_[a-z0-9_]+)(?:\{\w+\})?`", (ROOT / "docs" / "metrics.md").read_text()))
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    named = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"\b(cosine_[a-z0-9_]+)", e)}
    assert named and named - documented == set(), named - documented
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["alert"].startswith("Cosine") and r["labels"]["severity"] in ("critical", "warning", "info")
            assert r["annotations"]["summary"]
            assert r["alert"] in (ROOT / "docs" / "operations.md").read_text(), f"{r['alert']} is not explained"
    ops = (ROOT / "docs" / "operations.md").read_text()
    in_docs = {re.sub(r"_bucket$", "", m) for m in re.findall(r"\b(cosine_[a-z0-9_]+)", ops)}
    assert in_docs - documented == set(), in_docs - documented


def test_docs_commands_exist():
    """The command lines in docs/operations.md's code blocks, and deploy/README.md's."""
    seen = Seen()
    for f in (ROOT / "docs" / "operations.md", DEPLOY / "README.md"):
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", f.read_text(), re.S):
            for line in re.sub(r"\\\n", " ", block).splitlines():
                for argv in shell_cosine(line.split(" #", 1)[0]):
                    seen.cosine(argv, rel(f))
    assert seen.commands
