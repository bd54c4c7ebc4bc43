"""The sample app behind a real MONAI Label server on loopback: start, ``GET /info/``, ``POST /infer/ura_net``, stop.

The server is ``python -m monailabel.main start_server`` (what the ``monailabel`` script runs) on 127.0.0.1 and a
free port, with a pre-trained checkpoint given by ``--conf checkpoint``. Its environment points every proxy
variable at a closed local port, so any download attempted at start-up or inference (model zoo, SAM2 weights)
fails instead of reaching the network. All waits are bounded and the server is always stopped.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from conftest import make_app_dir
from PIL import Image
from requests_toolbelt.multipart.decoder import MultipartDecoder

START_TIMEOUT_S = 300  # imports torch, MONAI and MONAI Label on a busy 2-core machine
REQUEST_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
CLOSED_PORT_PROXY = "http://127.0.0.1:9"  # discard port: nothing listens, so a download fails at once


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGINT to the server's own process group (uvicorn shuts down cleanly), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        try:
            os.killpg(process.pid, sig)  # the group this test created with start_new_session
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(tmp_path_factory, studies, pretrained_checkpoint):
    folder, info = studies
    app_dir = make_app_dir(tmp_path_factory, "server_app")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "MONAI_LABEL_SESSION_PATH": str(tmp_path_factory.mktemp("sessions")),
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_TRACKING_ENABLED": "false",
            **{
                name: CLOSED_PORT_PROXY
                for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
            },
            "NO_PROXY": "",
            "no_proxy": "",
        }
    )
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(folder),
        "--conf",
        "models",
        "ura_net",
        "--conf",
        "checkpoint",
        str(pretrained_checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    session = requests.Session()
    session.trust_env = False  # talk to 127.0.0.1 directly, whatever proxies this environment sets
    with open(log_path, "wb") as log:
        # the server runs in the test's tmp folder: MONAI Label writes .env / logs relative to it
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(app_dir.parent), start_new_session=True
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            described = None
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                try:
                    reply = session.get(f"{base}/info/", timeout=10)
                    if reply.status_code == 200:
                        described = reply.json()
                        break
                except requests.RequestException:
                    pass
                time.sleep(1.0)
            if described is None:
                pytest.fail(
                    f"server did not answer /info/ within {START_TIMEOUT_S}s (exit code {process.poll()}):\n{log_path.read_text(errors='replace')[-6000:]}"
                )
            yield {"base": base, "session": session, "info": described, "studies": info, "log": log_path}
        finally:
            _stop(process)
            session.close()
    assert process.poll() is not None, "the server is still running"


def test_server_info_and_infer_on_loopback(server):
    base, session, info = server["base"], server["session"], server["studies"]
    described = server["info"]
    assert "ura_net" in described["models"] and "ura_net" in described["trainers"]
    assert described["models"]["ura_net"]["type"] == "segmentation"
    assert described["models"]["ura_net"]["labels"] == {"anomaly": 1}
    assert not any(name.startswith("sam") for name in described["models"])  # no SAM2 task, nothing downloaded
    image_id = "normal_wide"
    listed = session.get(f"{base}/datastore/", params={"output": "all"}, timeout=REQUEST_TIMEOUT_S).json()["objects"]
    assert image_id in listed and info["jpeg"][0] in listed and info["volume"] in listed

    # the default answer: multipart with the params (JSON) and the label (the anomaly mask as PNG)
    reply = session.post(f"{base}/infer/ura_net", params={"image": image_id}, timeout=REQUEST_TIMEOUT_S)
    assert reply.status_code == 200, reply.text[:2000]
    parts = MultipartDecoder.from_response(reply).parts
    by_name = {}
    for part in parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        by_name["params" if 'name="params"' in disposition else "image"] = part
    params = json.loads(by_name["params"].text)
    assert isinstance(params["anomaly_score"], float)
    assert params["decision"] in ("anomalous", "normal") and isinstance(params["threshold"], float)
    assert params["checkpoint"] == "initial.pt"
    mask = np.asarray(Image.open(io.BytesIO(by_name["image"].content)))
    width, height = info["sizes"][image_id]
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1}

    # params only, and a volume
    reply = session.post(
        f"{base}/infer/ura_net", params={"image": info["volume"], "output": "json"}, timeout=REQUEST_TIMEOUT_S
    )
    assert reply.status_code == 200, reply.text[:2000]
    volume_params = reply.json()
    assert volume_params["dimension"] == 3 and len(volume_params["slice_scores"]) == 5
    assert isinstance(volume_params["anomaly_score"], float)
