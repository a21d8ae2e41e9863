"""Routes follow the served tasks' declared Capabilities, and none of issue 15's inputs is a 5xx any more.

Each case of issue 15 that was a 500 has a test here: `:predict` on a causal LM,
`temperature: 1e-40`, an LM `:explain` with `target: -5`, a PNG over Pillow's pixel limit,
and `:predict` on the `minilm-l6` sentence encoder. Also: auth on every route, whichever
way the gate dispatches it.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from _serve_models import tiny_image_artifact
from _tiny_lm import serve_in_thread, tiny_lm_artifact
from test_serve import tiny_text_artifact

import dapeng

pytestmark = pytest.mark.xdist_group("serve")

KEY = "caps-key"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("caps")
    return {
        "tiny": dapeng.load(tiny_text_artifact(root / "text"), precision="fp32"),
        "img": dapeng.load(tiny_image_artifact(root / "image"), precision="fp32"),
        "minilm": dapeng.load("minilm-l6", precision="fp32"),
        "lm": dapeng.load(tiny_lm_artifact(root / "lm"), precision="fp32"),
    }


@pytest.fixture(scope="module")
def base(models) -> Iterator[str]:
    from dapeng.serve import ServeConfig, create_app

    with serve_in_thread(create_app(models, ServeConfig(torch_threads=1, max_new_tokens=16))) as url:
        yield url


def call(url: str, body: object | None = None, headers: dict | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_model_info_carries_the_declared_capabilities(base, models):
    for name, pipeline in models.items():
        status, info = call(f"{base}/v1/models/{name}")
        assert status == 200 and info["capabilities"] == pipeline.capabilities.to_dict()
    assert call(f"{base}/v1/models/lm")[1]["capabilities"]["verbs"] == ["generate", "explain"]


def test_predict_on_a_causal_lm_is_a_422_naming_the_routes_it_has(base):
    status, answer = call(f"{base}/v1/models/lm:predict", {"instances": ["the cat"]})
    assert status == 422
    [error] = answer["detail"]
    assert error["loc"] == ["path", "name"] and "can't predict" in error["msg"]
    assert "/v1/completions" in error["msg"] and "/v1/models/lm:explain" in error["msg"]


def test_a_tiny_temperature_samples_greedily_instead_of_failing(base, models):
    body = {"model": "lm", "prompt": "the cat", "max_tokens": 6, "temperature": 1e-40}
    status, answer = call(f"{base}/v1/completions", body)
    assert status == 200
    assert answer["choices"][0]["text"] == models["lm"].generate("the cat", max_new_tokens=6, temperature=0.0)


def test_lm_explain_checks_the_target_and_the_method(base):
    status, answer = call(f"{base}/v1/models/lm:explain", {"instances": ["the cat"], "method": "attention",
                                                            "target": -5})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "target"]
    assert "generated token" in answer["detail"][0]["msg"]
    status, answer = call(f"{base}/v1/models/lm:explain", {"instances": ["the cat"], "method": "ig"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "method"]
    assert "choose one of: attention, rollout" in answer["detail"][0]["msg"]
    status, answer = call(f"{base}/v1/models/lm:explain", {"instances": ["the cat"], "method": "attention"})
    assert status == 200 and answer["explanations"][0]["kind"] == "attention"


def test_a_png_over_pils_pixel_limit_is_a_422(base, monkeypatch):
    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (64, 64)).save(png, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the server runs in this process: 64x64 is over twice it
    status, answer = call(f"{base}/v1/models/img:predict", {"instances": [{"b64": base64.b64encode(png.getvalue())
                                                                            .decode()}]})
    assert status == 422 and "more than 1000 pixels" in answer["detail"][0]["msg"]
    assert answer["detail"][0]["loc"][:2] == ["body", "instances"]


def test_a_sentence_encoder_predicts_its_embeddings(base, models):
    status, answer = call(f"{base}/v1/models/minilm:predict", {"instances": ["a film", "a dog"]})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], models["minilm"].embed(["a film", "a dog"]), atol=1e-5)


def test_verbs_a_task_does_not_declare_are_refused_on_each_route(base):
    status, answer = call(f"{base}/v1/embeddings", {"model": "img", "input": "x"})
    assert status == 422 and answer["error"]["param"] == "model" and "can't embed" in answer["error"]["message"]
    status, answer = call(f"{base}/v1/chat/completions", {"model": "minilm", "messages": [
        {"role": "user", "content": "hi"}]})
    assert status == 422 and answer["error"]["param"] == "model" and "/v1/embeddings" in answer["error"]["message"]
    status, answer = call(f"{base}/v1/models/minilm:explain", {"instances": ["a film"]})
    assert status == 422 and "can't explain" in answer["detail"][0]["msg"]
    status, answer = call(f"{base}/v1/models/tiny:explain", {"instances": ["a film"], "method": "gradcam"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "method"]
    status, answer = call(f"{base}/v2/models/lm")
    assert status == 400 and "/v1/completions" in answer["error"]


def test_openapi_describes_predictions_with_the_tasks_output_schemas(base, models):
    status, spec = call(f"{base}/openapi.json")
    assert status == 200
    ref = spec["paths"]["/v1/models/{name}:predict"]["post"]["responses"]["200"]["content"]["application/json"]
    name = ref["schema"]["$ref"].rsplit("/", 1)[1]
    items = spec["components"]["schemas"][name]["properties"]["predictions"]["items"]
    expected = [models["tiny"].capabilities.output_schema, models["minilm"].capabilities.output_schema]
    assert items == {"anyOf": expected}
    assert {"/v2/models/{name}/infer", "/v2/health/ready", "/v2/models/{name}"} <= set(spec["paths"])


def test_auth_draining_and_metrics_hold_on_every_route(models):
    from dapeng.serve import ServeConfig, create_app

    app = create_app({"tiny": models["tiny"], "lm": models["lm"]}, ServeConfig(torch_threads=1, api_key=KEY))
    posts = {
        "/v1/models/tiny:predict": {"instances": ["x"]},
        "/v1/models/tiny:explain": {"instances": ["x"]},
        "/v2/models/tiny/infer": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
        "/v1/completions": {"model": "lm", "prompt": "the", "max_tokens": 2},
    }
    with serve_in_thread(app) as url:
        for path, body in posts.items():
            assert call(f"{url}{path}", body)[0] == 401, path
            assert call(f"{url}{path}", body, {"Authorization": "Bearer wrong"})[0] == 401, path
            assert call(f"{url}{path}", body, {"X-API-Key": KEY})[0] == 200, path
        for path in ("/v1/models", "/v1/models/tiny", "/v2/models/tiny", "/v2/models/tiny/ready", "/v2"):
            assert call(f"{url}{path}")[0] == 401 and call(f"{url}{path}", None, {"X-API-Key": KEY})[0] == 200
        for path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
            assert call(f"{url}{path}")[0] == 200, path
        status, answer = call(f"{url}/v2/models/tiny/infer", posts["/v2/models/tiny/infer"])
        assert status == 401 and set(answer) == {"error"}
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for path in ("/v1/models/{name}:predict", "/v1/models/{name}:explain", "/v2/models/{name}/infer"):
            assert any(line.startswith("dapeng_requests_total") and f'endpoint="{path}"' in line
                       and 'code="401"' in line for line in metrics.splitlines()), path
        app.state.serve.begin_drain()
        for path, body in posts.items():
            assert call(f"{url}{path}", body, {"X-API-Key": KEY})[0] == 503, path
        assert call(f"{url}/v2/health/ready")[0] == 503 and call(f"{url}/ready")[0] == 503
