"""The user's path to the fast endpoint: `gpufleet up` (HAProxy in front of Ray Serve), `gpufleet serve`
of one model (its replica serves the OpenAI API itself), queried with the openai client, `gpufleet down`."""

import json
import os

import psutil
import pytest
import requests
import yaml
from openai import OpenAI

from gpufleet.cluster.head import free_port, haproxy_binary, head_processes, load_state
from tests.test_head import cli

pytestmark = pytest.mark.slow
KEY_ENV, KEY = "GPUFLEET_TEST_API_KEY", "test-key-456"

if not haproxy_binary():
    if os.environ.get("CI"):  # `make test` installs it: a CI without it has lost an install step
        raise RuntimeError("haproxy is not installed; `make install` should have installed it")
    pytest.skip("haproxy is not installed (sudo apt-get install haproxy)", allow_module_level=True)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("home")
    up = cli(home, "up", "--num-cpus", "8", "--dashboard-port", str(free_port()), "--no-monitor")
    port = free_port()
    spec = home / "serve.yaml"
    spec.write_text(yaml.safe_dump({"name": "direct", "port": port, "api_key_env": KEY_ENV, "models": [
        {"id": "tiny", "source": str(tiny_model), "max_model_len": 256, "concurrency": 4}]}))
    os.environ[KEY_ENV] = KEY
    try:
        served = cli(home, "serve", str(spec))
        yield home, port, up.stdout, served.stdout
    finally:
        cli(home, "down", check=False)


def listener(port: int) -> psutil.Process:
    conn = next(c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port)
    return psutil.Process(conn.pid)


def test_up_puts_haproxy_in_front_of_serve_by_default(endpoint):
    home, _, up_out, _ = endpoint
    assert "serve proxy: HAProxy" in up_out
    assert load_state(home).serve_env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_one_model_is_served_by_its_replica_directly(endpoint):
    home = endpoint[0]
    apps = json.loads(cli(home, "status", "--json").stdout)["serve_apps"]
    deployments = set(next(a for a in apps if a["name"] == "direct")["deployments"])
    assert "GpufleetServer:tiny" in deployments and "GpufleetIngress" not in deployments


def test_endpoint_is_haproxy_on_loopback(endpoint):
    _, port, _, served = endpoint
    assert f"http://127.0.0.1:{port}/v1 (HAProxy, the replica serves the API itself)" in " ".join(served.split())
    proc = listener(port)
    assert proc.name() == "haproxy"
    assert {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port} \
        == {"127.0.0.1"}


def test_one_model_answers_plain_and_streaming(endpoint):
    _, port, _, _ = endpoint
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 5
    texts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="import", max_tokens=6,
                                                                 temperature=0, stream=True) if c.choices]
    assert len([t for t in texts if t]) >= 2


def test_requests_without_the_key_get_401(endpoint):
    _, port, _, _ = endpoint
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_down_stops_haproxy_with_the_head(endpoint):
    home, port, _, _ = endpoint
    head_id = load_state(home).head_id
    assert any(p.name() == "haproxy" for p in head_processes(head_id))
    assert "stopped" in cli(home, "down").stdout
    assert head_processes(head_id) == []
    assert not [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
