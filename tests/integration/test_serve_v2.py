"""KServe V2 (Open Inference Protocol) with the official `tritonclient[http]` against a real 127.0.0.1 socket.

A text classifier, an image classifier, the built-in `minilm-l6` encoder and a tiny LM
(which can't predict) are served; every answer is held to the Pipeline called in-process.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from _serve_models import tiny_image_artifact
from _tiny_lm import serve_in_thread, tiny_lm_artifact
from test_serve import tiny_text_artifact

import dapeng

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402 (after the importorskip)

pytestmark = pytest.mark.xdist_group("serve")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("v2")
    return {
        "tiny": dapeng.load(tiny_text_artifact(root / "text"), precision="fp32"),
        "img": dapeng.load(tiny_image_artifact(root / "image"), precision="fp32"),
        "minilm": dapeng.load("minilm-l6", precision="fp32"),
        "lm": dapeng.load(tiny_lm_artifact(root / "lm"), precision="fp32"),
    }


@pytest.fixture(scope="module")
def base(models) -> Iterator[str]:
    from dapeng.serve import ServeConfig, create_app

    with serve_in_thread(create_app(models, ServeConfig(torch_threads=1, max_items=8))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    with httpclient.InferenceServerClient(url=base.removeprefix("http://")) as client:
        yield client


def text_input(texts: list[str], name: str = "text"):
    tensor = httpclient.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
    return tensor


def wanted(*names: str) -> list:
    return [httpclient.InferRequestedOutput(n, binary_data=False) for n in names]


def batches(base: str, model: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("dapeng_batch_size_count") and f'model="{model}"' in line)


def test_health_server_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("img")
    assert client.get_server_metadata()["name"] == "dapeng"
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["platform"] == "dapeng" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("probabilities", "FP32", [-1, 2])]
    assert client.get_model_metadata("img")["inputs"][0] == {"name": "image", "datatype": "UINT8",
                                                             "shape": [-1, -1, -1, -1]}
    assert client.get_model_metadata("minilm")["outputs"] == [{"name": "embedding", "datatype": "FP32",
                                                               "shape": [-1, -1]}]


def test_text_infer_matches_the_pipeline_and_goes_through_the_batcher(client, base, models):
    texts = ["good film", "the plot was awful and poor, a bad film", "unknown words"]
    before = batches(base, "tiny")
    result = client.infer("tiny", [text_input(texts)], outputs=wanted("label", "score", "probabilities"),
                          request_id="r-1")
    local = models["tiny"].predict(texts)
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == [p["label"] for p in local]
    np.testing.assert_allclose(result.as_numpy("score"), [p["score"] for p in local], atol=1e-5)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities, [[p["probabilities"][k] for k in ("neg", "pos")] for p in local],
                               atol=1e-5)
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == "tiny"
    assert batches(base, "tiny") > before  # the V1 batcher ran it
    only = client.infer("tiny", [text_input(texts[:1])], outputs=wanted("label"))
    assert [o["name"] for o in only.get_response()["outputs"]] == ["label"]


def test_image_pixels_and_vectors(client, models):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    tensor = httpclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=False)
    result = client.infer("img", [tensor], outputs=wanted("label", "score"))
    local = models["img"].predict(list(images))
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == [p["label"] for p in local]
    np.testing.assert_allclose(result.as_numpy("score"), [p["score"] for p in local], atol=1e-5)
    vectors = client.infer("minilm", [text_input(["a film", "a dog"])], outputs=wanted("embedding"))
    np.testing.assert_allclose(vectors.as_numpy("embedding"), models["minilm"].embed(["a film", "a dog"]), atol=1e-5)


def test_the_clients_defaults_send_binary_tensors(client, models):
    """`set_data_from_numpy` without `binary_data=False` and no requested outputs: the binary extension."""
    import io

    from PIL import Image

    texts = ["good film", "awful plot"]
    tensor = httpclient.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    result = client.infer("tiny", [tensor])
    local = models["tiny"].predict(texts)
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == [p["label"] for p in local]
    images = np.random.default_rng(2).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    pixels = httpclient.InferInput("image", list(images.shape), "UINT8")
    pixels.set_data_from_numpy(images)
    np.testing.assert_allclose(client.infer("img", [pixels]).as_numpy("score"),
                               [p["score"] for p in models["img"].predict(list(images))], atol=1e-5)
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    files = httpclient.InferInput("image", [1], "BYTES")
    files.set_data_from_numpy(np.array([png.getvalue()], dtype=object))
    np.testing.assert_allclose(client.infer("img", [files]).as_numpy("score"),
                               [models["img"].predict([images[0]])[0]["score"]], atol=1e-5)


def test_binary_data_that_does_not_add_up_is_a_400(base):
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 50}}]}).encode()
    for length, blob in ((len(header), b"\x03\x00\x00\x00abc"), (len(header) + 99, b""), (len(header), b"")):
        request = urllib.request.Request(f"{base}/v2/models/tiny/infer", data=header + blob, headers={
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 400 and set(json.loads(err.value.read())) == {"error"}


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        ("tiny", lambda: [text_input(["x"], name="words")], "named 'text'"),
        ("tiny", lambda: [text_input(["x"] * 9)], "batch size, 1 to 8"),
        ("lm", lambda: [text_input(["x"])], "/v1/completions"),
        ("img", lambda: [text_input(["not base64 of an image"], name="image")], "inputs"),
    ],
)
def test_bad_requests_are_400_with_the_v2_error(client, model, inputs, message):
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs(), outputs=wanted())
    assert err.value.status() == "400" and message in err.value.message()


def test_unknown_model_and_output_and_malformed_tensors(client, base):
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [text_input(["x"])])
    assert err.value.status() == "404" and "tiny" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", [text_input(["x"])], outputs=wanted("logits"))
    assert err.value.status() == "400" and "logits" in err.value.message()
    for body in ({"inputs": []}, {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["x"]}]},
                 {"inputs": [{"name": "text", "shape": [1], "datatype": "STRING", "data": ["x"]}]},
                 {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}):
        request = urllib.request.Request(f"{base}/v2/models/tiny/infer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(request, timeout=10)
        assert http_err.value.code == 400 and set(json.loads(http_err.value.read())) == {"error"}
