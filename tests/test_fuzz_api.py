"""Schema-driven fuzzing of the HTTP API (schemathesis, from the app's own OpenAPI schema) against
a real engine serving the tiny Llama 3.1 artifact: no input may produce a 5xx, and the server keeps
serving afterwards."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from llama_aot.bench.server_process import free_port


@pytest.fixture(scope="module")
def fuzz_app(llama31_artifact):
    from llama_aot.serve.cli import build_server, parse_args

    server, engine = build_server(parse_args([str(llama31_artifact), "--port", str(free_port()),
                                              "--tool-call-parser", "llama3", "--context-length", "256",
                                              "--kv-cache-blocks", "64"]))
    engine.start()
    yield server.config.app
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
CASES = [(method, path, mode) for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"))
         for mode in (POSITIVE, NEGATIVE)] + [("GET", path, POSITIVE) for path in ("/v1/models", "/health", "/metrics")]


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_input_causes_a_server_error(api_schema, method, path, mode):
    """Positive mode sends schema-valid bodies (which still hit range, context and template
    checks); negative mode sends bodies that violate the schema (GET routes take no input to
    violate)."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40 if method == "POST" else 5, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call()
        assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    fuzz()


def test_still_serving_after_fuzzing(fuzz_app):
    from fastapi.testclient import TestClient

    r = TestClient(fuzz_app).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
