"""The deployment files agree with each other, with the Procfile and with Settings: docker-compose.yml (two Slack
web processes behind Caddy, a Discord worker, PostgreSQL), the Dockerfile, deploy/Caddyfile and .env.example.

No Docker daemon is needed: the files are parsed here; `docker compose config` and `caddy adapt` also run
where those tools are installed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from bot.config import Settings

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("release", "web", "worker")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # safe_load resolves the `<<` merges


def procfile() -> dict[str, list[str]]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name: shlex.split(command) for name, command in (line.split(":", 1) for line in lines if line.strip())}


def settings_variables() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else [])
    return names


def test_compose_runs_two_slack_web_processes_behind_the_proxy_a_discord_worker_and_postgres():
    services = compose()["services"]
    assert set(services) >= {"web", "worker", "proxy", "postgres", "release"}
    web, worker, proxy = services["web"], services["worker"], services["proxy"]
    assert web["deploy"]["replicas"] == 2
    assert "ports" not in web and "ports" not in worker  # only the proxy is reachable from outside
    assert {str(port).split(":")[0] for port in proxy["ports"]} == {"80", "443"}
    caddyfile = next(v.split(":")[0] for v in proxy["volumes"] if v.endswith("/etc/caddy/Caddyfile:ro"))
    assert re.search(rf"dynamic a web {web['environment']['PORT']}\b", (ROOT / caddyfile).read_text())
    assert worker["healthcheck"] == {"disable": True}  # no HTTP in a Discord-only process
    assert services["postgres"]["image"].startswith("postgres:")


def test_compose_processes_are_the_procfiles():
    services, processes = compose()["services"], procfile()
    assert services["web"]["command"] == processes["web"]
    assert services["worker"]["command"] == processes["worker"]
    assert services["release"]["command"] == processes["release"]
    for name in ("web", "worker"):
        assert services[name]["depends_on"]["release"] == {"condition": "service_completed_successfully"}


def test_every_variable_compose_sets_for_personabot_is_one_settings_reads():
    services, known = compose()["services"], settings_variables()
    for name in APP_SERVICES:
        service = services[name]
        assert service["env_file"] == ".env"
        assert set(service["environment"]) <= known, name
        url = service["environment"]["DATABASE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert Settings(_env_file=None, **services["worker"]["environment"] | {
        "DATABASE_URL": "postgresql://personabot:pw@postgres:5432/personabot",
        "DISCORD_SHARD_COUNT": "", "DISCORD_SHARD_IDS": ""}).discord_shard_ids is None  # blank = unset


def test_data_every_process_needs_is_on_shared_volumes():
    services = compose()["services"]
    declared = set(compose()["volumes"])
    mounts = [{v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]} for name in APP_SERVICES]
    assert all(m == mounts[0] for m in mounts)
    shared = mounts[0]
    data_dir = services["web"]["environment"]["PERSONABOT_DATA_DIR"]
    assert {"/app/knowledge", f"{data_dir}/workspaces", f"{data_dir}/models"} <= set(shared)
    assert set(shared.values()) <= declared
    # A fresh named volume takes the owner of the image's folder it is mounted on: those folders must exist in
    # the image and belong to its (non-root) user, or the bot could not write to its own volumes.
    dockerfile = (ROOT / "Dockerfile").read_text()
    made = set(re.findall(r"/data/\w+|/app/knowledge", " ".join(re.findall(r"mkdir -p ([^&\n]+)", dockerfile))))
    assert set(shared) - {"/app/knowledge"} <= made and "chown -R personabot" in dockerfile


def test_env_example_names_only_settings_and_the_compose_files_own_variables():
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert "POSTGRES_PASSWORD" in named
    assert named <= settings_variables() | interpolated


def test_dockerfile_is_slim_cpu_torch_non_root_and_checks_healthz():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile_torch = re.search(r"pip install --quiet (torch==[\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert f"pip install {makefile_torch} --index-url" in dockerfile and "whl/cpu" in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", dockerfile, re.MULTILINE)
    assert re.search(r'^CMD \["personabot", "run"\]$', dockerfile, re.MULTILINE)


def test_readme_deploy_section_walks_through_these_files():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deploy", 1)[1].split("\n## ", 1)[0]
    for needed in ("cp .env.example .env", "docker compose up", "docker-compose.yml", "Dockerfile",
                   "deploy/Caddyfile", "Procfile", "DATABASE_URL", "--scale web="):
        assert needed in section, needed


def test_docker_compose_accepts_the_file(tmp_path):
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    for compose_cli in (["docker", "compose"], ["docker-compose"]):  # the plugin (v2), else the standalone one
        if shutil.which(compose_cli[0]) and subprocess.run([*compose_cli, "version"], capture_output=True).returncode == 0:
            break
    else:
        pytest.skip("no docker compose here (the docker CLI lacks its compose plugin)")
    result = subprocess.run([*compose_cli, "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not shutil.which("caddy"), reason="caddy is not installed")
def test_caddy_accepts_the_caddyfile():
    result = subprocess.run(["caddy", "adapt", "--config", str(ROOT / "deploy/Caddyfile"), "--adapter", "caddyfile"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"dynamic_upstreams"' in result.stdout


@pytest.mark.skipif(not shutil.which("caddy"), reason="caddy is not installed")
def test_caddy_serves_plain_http_when_env_leaves_the_public_url_out():
    given = compose()["services"]["proxy"]["environment"]["PERSONABOT_PUBLIC_URL"]
    left_out = re.fullmatch(r"\$\{PERSONABOT_PUBLIC_URL:-(.*)\}", given).group(1)  # what compose then passes
    result = subprocess.run(["caddy", "adapt", "--config", str(ROOT / "deploy/Caddyfile"), "--adapter", "caddyfile"],
                            capture_output=True, text=True, env={**os.environ, "PERSONABOT_PUBLIC_URL": left_out})
    assert result.returncode == 0, result.stderr
    assert '"listen":[":80"]' in result.stdout
