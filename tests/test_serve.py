"""serve.py: the restoration page's HTTP server on the tiny backbones, through HTTP as the page talks to it.

The server runs in a thread on an ephemeral loopback port; uploads are raw bodies to POST /api/jobs (what the
page's fetch sends), progress is polled from /api/jobs/ID, results are fetched from /files/ID/NAME.
"""

import base64
import dataclasses
import errno
import fcntl
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import backbone
import data
import defaults
import estimator
import media
import prompts
import restore
import serve
import streaming
import training

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both tiny backbones; the image one with a prompt trained for a few steps (choice "prompt"; a large
    learning rate, so that it visibly changes the restoration)."""
    root = tmp_path_factory.mktemp("prompt")
    spec = backbone.BACKBONES["tiny-flux"]
    dataset = data.toy_dataset(False, "noise", spec.train_size, None)
    options = training.TrainOptions(prompt_len=spec.prompt_len, steps=4, batch=2, lr=1.0, log_every=100)
    training.train(backbone.tiny("flux"), dataset, options, root)
    return {"image": serve.make_model(backbone.load("tiny-flux"), [root / "prompt.safetensors"]),
            "video": serve.make_model(backbone.load("tiny-wan"), [])}


def start_server(models, max_bytes=1 << 30):
    root = Path(tempfile.mkdtemp(prefix="test-serve-"))
    jobs = serve.Jobs(models, root, max_bytes, max_frames=17)
    server = serve.Server(("127.0.0.1", 0), jobs, root, MAX_UPLOAD, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server):
    server.shutdown()
    server.server_close()
    server.jobs.stop()
    shutil.rmtree(server.root)


@pytest.fixture(scope="module")
def server(models):
    server = start_server(models)
    yield server
    stop_server(server)


def request(server, method, path, body=None, headers=None, page=True):
    """(status, body bytes) of one request; `path` is sent exactly as given (no normalisation). A POST carries
    the page's header unless `page` is False."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    headers = {**({"X-Restore-Page": "1"} if method == "POST" and page else {}), **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def png(image: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(out, format="PNG")
    return out.getvalue()


def upload(server, body: bytes, **query) -> dict:
    query = "&".join(f"{k}={v}" for k, v in query.items())
    status, reply = request(server, "POST", f"/api/jobs?{query}", body, {"Content-Type": "application/octet-stream"})
    assert status == 202, reply
    return json.loads(reply)


def wait(server, job_id, states=serve.FINISHED, timeout=120) -> dict:
    """Poll the job until it is in one of `states`; the progress seen must only go up."""
    seen = -1
    for _ in range(int(timeout / 0.05)):
        status, reply = request(server, "GET", f"/api/jobs/{job_id}")
        assert status == 200, reply
        job = json.loads(reply)
        assert job["done"] >= seen
        seen = job["done"]
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def error_of(reply: bytes) -> str:
    return json.loads(reply)["error"]


def test_t0_defaults_to_the_prompts_then_the_backbone_of_the_upload(server, models, monkeypatch):
    model = models["image"]  # as mini-wan's 0.2 differs from the images' 0.4:
    monkeypatch.setitem(backbone.BACKBONES, model.bb.name, dataclasses.replace(model.bb.spec, t0=0.25))
    status, reply = request(server, "GET", "/api/info")
    assert status == 200 and json.loads(reply)["defaults"]["t0"]["image"] == 0.25
    image = data.toy_images(1, 32, 32, seed=2)[0]
    job = wait(server, upload(server, png(image), name="a.png", steps=1, image_prompt="none")["id"])  # no t0 and
    assert job["state"] == "done" and job["t0"] == 0.25  # no prompt: the backbone's
    job = wait(server, upload(server, png(image), name="b.png", steps=1, t0="", image_prompt="none")["id"])
    assert job["t0"] == 0.25  # an empty field: the same
    job = wait(server, upload(server, png(image), name="p.png", steps=1, image_prompt="prompt")["id"])
    assert job["t0"] == defaults.T0  # a prompt: the T0 it was trained at
    job = wait(server, upload(server, png(image), name="c.png", steps=1, t0=0.5)["id"])  # given: kept
    assert job["t0"] == 0.5


def test_image_round_trip_equals_the_library(server, models):
    image = data.toy_images(1, 40, 56, seed=1)[0]  # sizes not multiples of 16: padded and cropped back
    image = (image * 255).round() / 255  # what an 8-bit PNG holds
    job = upload(server, png(image), name="photo.png", image_prompt="prompt", steps=3, t0=0.5)
    assert (job["kind"], job["prompt"]) == ("image", "prompt") and job["state"] in ("queued", "running")
    job = wait(server, job["id"])
    assert job["state"] == "done" and job["done"] == job["total"] == 3, job
    status, body = request(server, "GET", job["files"]["output.png"])
    assert status == 200
    restored = torch.from_numpy(np.array(Image.open(io.BytesIO(body)))).permute(2, 0, 1).float() / 255
    assert restored.shape == (3, 40, 56)
    status, body = request(server, "GET", job["files"]["input.png"])
    assert torch.equal(torch.from_numpy(np.array(Image.open(io.BytesIO(body)))).permute(2, 0, 1).float() / 255,
                       image)
    model = models["image"]
    expected = restore.restore_image(model.bb, model.velocities["prompt"], image,
                                     restore.RestoreOptions(steps=3, t0=0.5))
    assert (restored - expected).abs().max() <= 1 / 255 + 1e-6  # the library's restoration, 8-bit rounded
    plain = restore.restore_image(model.bb, model.velocities["none"], image, restore.RestoreOptions(steps=3, t0=0.5))
    assert (plain - expected).abs().max() > 0.05  # the prompt choice reached the restoration


def test_video_round_trip(server, tmp_path):
    clip = data.toy_videos(1, 5, 32, 48, seed=2)[0]
    media.write_video(tmp_path / "clip.mp4", clip, fps=12)
    job = upload(server, (tmp_path / "clip.mp4").read_bytes(), name="clip.mp4", steps=2)
    assert job["kind"] == "video"
    job = wait(server, job["id"])
    assert job["state"] == "done" and job["done"] == job["total"] == 2, job
    for name in ("input.mp4", "output.mp4"):
        status, body = request(server, "GET", job["files"][name])
        assert status == 200
        (tmp_path / name).write_bytes(body)
        info = media.probe_video(tmp_path / name)
        assert (info.frames, info.fps, info.height, info.width) == (5, 12, 32, 48)
    status, body = request(server, "GET", job["files"]["strip.png"])
    assert Image.open(io.BytesIO(body)).size == (5 * 144, 2 * serve.STRIP_HEIGHT)  # 5 frames, 48/32 * 96 wide


def test_refusals_are_clear_json_errors(server, tmp_path):
    kept = set(server.root.iterdir())
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/jobs")
    conn.putheader("X-Restore-Page", "1")
    conn.putheader("Content-Length", str(MAX_UPLOAD + 1))
    conn.endheaders()  # the body is never sent: the size alone is refused
    response = conn.getresponse()
    assert response.status == 413 and "at most 1.0 MiB" in error_of(response.read())
    conn.close()
    status, reply = request(server, "POST", "/api/jobs", b"#!/bin/sh\necho not a picture\n" * 10)
    assert status == 400 and "neither an image nor a video" in error_of(reply)
    rgba = io.BytesIO()
    Image.new("RGBA", (32, 32)).save(rgba, format="PNG")
    status, reply = request(server, "POST", "/api/jobs", rgba.getvalue())
    assert status == 400 and "alpha" in error_of(reply) and str(server.root) not in error_of(reply)
    image = png(torch.rand(3, 32, 32))
    status, reply = request(server, "POST", "/api/jobs?image_prompt=haze", image)
    assert status == 400 and "unknown prompt 'haze'" in error_of(reply)
    status, reply = request(server, "POST", "/api/jobs?steps=two", image)
    assert status == 400 and "bad settings" in error_of(reply)
    status, reply = request(server, "POST", "/api/jobs?t0=2", image)
    assert status == 400 and "T0" in error_of(reply)
    status, reply = request(server, "POST", "/api/jobs?image_prompt=text&text=sharp", image)
    assert status == 400 and "no text prompting" in error_of(reply)
    media.write_video(tmp_path / "long.mp4", data.toy_videos(1, 18, 32, 32, seed=3)[0], fps=12)
    status, reply = request(server, "POST", "/api/jobs", (tmp_path / "long.mp4").read_bytes())
    assert status == 400 and "at most 17" in error_of(reply)
    assert set(server.root.iterdir()) == kept  # nothing refused was kept


def test_only_the_page_and_job_files_are_served(server):
    job = wait(server, upload(server, png(torch.rand(3, 32, 32)), steps=1)["id"])
    assert request(server, "GET", job["files"]["output.png"])[0] == 200
    secret = server.root / "secret.txt"
    secret.write_text("private")
    try:
        for path in ["/../serve.py", "/%2e%2e/serve.py", "/%2E%2E%2Fserve.py", "/files/../serve.py",
                     f"/files/{job['id']}/../../serve.py", f"/files/{job['id']}/%2e%2e%2f%2e%2e%2fserve.py",
                     f"/files/%2e%2e/{job['id']}/output.png", "/files/%2e%2e/secret.txt", "/files/../secret.txt",
                     f"/files/{job['id']}/upload", f"/files/{job['id']}/", f"/files/{job['id']}", "/files/",
                     "/serve.html", "/serve.py", "//etc/passwd", "/%2fetc%2fpasswd", "/api/../serve.py",
                     f"/files/{job['id']}/output.png/..", "/files/0123456789abcdef/output.png"]:
            status, reply = request(server, "GET", path)
            assert status == 404 and "error" in json.loads(reply), path
    finally:
        secret.unlink()


def test_malformed_requests_never_stop_the_server(server):
    for raw in [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\xff" * 100 + b"\r\n\r\n",
                b"POST /api/jobs HTTP/1.1\r\nContent-Length: nine\r\n\r\n",
                b"POST /api/jobs HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort"]:
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            reply = b""  # (an unparseable request line is answered HTTP/0.9 style: no status line)
            while chunk := sock.recv(65536):  # the server closes the connection after an error
                reply += chunk
            assert b'{"error": ' in reply, (raw, reply)
    assert request(server, "DELETE", "/api/jobs")[0] == 501
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    for _ in range(2):  # keep-alive: one connection, several requests
        conn.request("GET", "/api/info")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Connection") != "close" and response.read()
    smuggled = b"POST /api/jobs HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    conn.request("POST", "/api/jobs/0123456789abcdef/cancel", body=smuggled, headers={"X-Restore-Page": "1"})
    response = conn.getresponse()  # an unread body is never taken for the next request: the connection closes
    assert response.status == 404 and response.getheader("Connection") == "close"
    conn.close()
    status, reply = request(server, "GET", "/api/info")
    assert status == 200 and json.loads(reply)["models"]["image"]["prompts"] == ["none", "prompt"]
    status, page = request(server, "GET", "/")
    assert status == 200 and b"/api/jobs" in page and b"http://" not in page and b"https://" not in page  # offline


def test_concurrent_uploads_finish_in_order(server):
    jobs, errors = [], []

    def send(seed):
        try:
            jobs.append(upload(server, png(torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(seed))),
                               steps=20))
        except AssertionError as err:
            errors.append(err)

    threads = [threading.Thread(target=send, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(jobs) == 2
    first, second = sorted((server.jobs.jobs[job["id"]] for job in jobs), key=lambda job: job.created)
    for job in (first, second):
        assert wait(server, job.id)["state"] == "done"
    assert first.started <= first.finished <= second.started  # one at a time, in the order they came


def test_cancel_a_running_and_a_queued_job(server):
    running = upload(server, png(torch.rand(3, 32, 32)), steps=1000)
    queued = upload(server, png(torch.rand(3, 32, 32)), steps=1000)
    assert wait(server, queued["id"], ("queued",))["position"] == 1
    wait(server, running["id"], ("running",))
    for job in (queued, running):
        status, reply = request(server, "POST", f"/api/jobs/{job['id']}/cancel")
        assert status == 200
    queued, running = wait(server, queued["id"]), wait(server, running["id"])
    assert queued["state"] == running["state"] == "cancelled"
    assert queued["done"] == 0 and running["done"] < 1000 and "output.png" not in running["files"]
    assert request(server, "POST", "/api/jobs/0123456789abcdef/cancel")[0] == 404
    after = wait(server, upload(server, png(torch.rand(3, 32, 32)), steps=1)["id"])
    assert after["state"] == "done"  # the worker goes on


def test_storage_cap_evicts_the_oldest_results(models):
    server = start_server(models)
    try:
        first = wait(server, upload(server, png(torch.rand(3, 32, 32)), steps=1)["id"])
        assert request(server, "GET", first["files"]["output.png"])[0] == 200
        body = png(torch.rand(3, 32, 32))
        server.jobs.max_bytes = serve.folder_bytes(server.root) + len(body) + 100  # room for the upload, not its result
        second = wait(server, upload(server, body, steps=1)["id"])
        assert request(server, "GET", first["files"]["output.png"])[0] == 404
        assert not (server.root / first["id"]).exists()
        assert "evicted" in wait(server, first["id"])["error"]
        assert request(server, "GET", second["files"]["output.png"])[0] == 200
    finally:
        stop_server(server)


def test_auto_restores_with_the_estimators_decision(tmp_path):
    bb = backbone.load("tiny-flux")
    files = []
    for i, name in enumerate(["noise", "haze", "lowlight"]):  # deep prompts with non-zero gates: each one matters
        torch.manual_seed(10 + i)
        prompt = bb.new_prompt("deep", 4)
        with torch.no_grad():
            prompt.prompts.normal_(0, 1)
            prompt.alphas.fill_(0.5)
        files.append(tmp_path / f"{name}.safetensors")
        prompts.save_prompt(prompt, files[-1], {"backbone": "flux", "config": bb.config, "site": "deep",
                                                "degradation": name, "t0": 0.4})
    torch.manual_seed(0)
    estimator.save_bank(tmp_path / "bank.safetensors", files,
                        estimator.Estimator(["noise", "haze", "lowlight"], size=32, detail=32, width=8))
    model = serve.make_model(bb, [], bank=tmp_path / "bank.safetensors")
    assert model.describe()["prompts"] == ["auto", "none", "noise", "haze", "lowlight"] and model.default == "auto"
    server = start_server({"image": model})
    try:
        image = (data.toy_images(1, 32, 48, seed=5)[0] * 255).round() / 255
        job = wait(server, upload(server, png(image), steps=2)["id"])  # no choice: the default, auto
        assert job["state"] == "done" and job["prompt"] == "auto", job
        velocity, decided = restore.blind_velocity(bb, model.bank, image)
        assert job["auto"] == estimator.describe_weights(decided)
        status, body = request(server, "GET", job["files"]["output.png"])
        restored = torch.from_numpy(np.array(Image.open(io.BytesIO(body)))).permute(2, 0, 1).float() / 255
        expected = restore.restore_image(bb, velocity, image, restore.RestoreOptions(steps=2))
        assert (restored - expected).abs().max() <= 1 / 255 + 1e-6
    finally:
        stop_server(server)


def test_command_line_private_folder_removed_on_exit():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "serve.py", "--preset", "tiny", "--port", "0"], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving on")):
            lines.append(process.stderr.readline())
            assert lines[-1], "".join(lines)
        address = lines[-1].split()[2]
        folder = Path(lines[-1].split("files in ")[1].split(",")[0])
        assert address.startswith("http://127.0.0.1:")
        assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
        host, port = address[7:-1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/api/info")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert not folder.exists()


# ---------------------------------------------------------------------------------------------- hostile input


def start_custom(models, **limits):
    """A server with its own limits: Jobs keywords (max_bytes, max_frames, max_pixels, max_queue, max_records)
    and Server keywords (timeout, max_connections)."""
    root = Path(tempfile.mkdtemp(prefix="test-serve-"))
    server_keys = {k: limits.pop(k) for k in ("timeout", "max_connections") if k in limits}
    jobs = serve.Jobs(models, root, limits.pop("max_bytes", 1 << 30), limits.pop("max_frames", 17), **limits)
    server = serve.Server(("127.0.0.1", 0), jobs, root, MAX_UPLOAD, quiet=True, **server_keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def hold_worker(server):
    """Make the worker wait inside its first job until the returned event is set (jobs behind it stay queued)."""
    release, run = threading.Event(), server.jobs._run

    def held(job):
        release.wait(60)
        return run(job)

    server.jobs._run = held
    return release


def png_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose header (IHDR, CRC fixed) claims width x height: a decompression bomb's header."""
    import struct
    import zlib

    body = bytearray(png(torch.rand(3, 16, 16)))
    body[16:24] = struct.pack(">II", width, height)
    body[29:33] = struct.pack(">I", zlib.crc32(bytes(body[12:29])))
    return bytes(body)


def test_the_worker_survives_what_happens_outside_a_job(models, monkeypatch):
    """An error after a job (the old eviction walked a folder a failed upload was deleting) never ends the
    worker: the next upload is still restored. folder_bytes itself survives folders vanishing mid-walk."""
    server = start_custom(models)
    try:
        calls = []

        def broken():
            calls.append(1)
            raise FileNotFoundError("a folder vanished during the walk")

        monkeypatch.setattr(server.jobs, "_forget_locked", broken)
        first = wait(server, upload(server, png(torch.rand(3, 16, 16)), steps=1)["id"])
        assert calls and server.jobs.worker.is_alive()
        monkeypatch.undo()
        second = wait(server, upload(server, png(torch.rand(3, 16, 16)), steps=1)["id"])
        assert second["state"] == "done" and first["id"] != second["id"]
    finally:
        stop_server(server)
    root = Path(tempfile.mkdtemp())
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            folder = root / secrets_name()
            folder.mkdir()
            (folder / "f").write_bytes(b"x" * 10)
            shutil.rmtree(folder)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(300):
            assert serve.folder_bytes(root) >= 0
    finally:
        stop.set()
        thread.join()
        shutil.rmtree(root)


def secrets_name() -> str:
    return os.urandom(4).hex()


def raw_exchange(server, raw: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(raw)  # (the connection stays open for writing: the server must answer by itself)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def test_a_negative_or_odd_content_length_is_refused_before_reading(server):
    for length in ("-1", "1_0", "+5", "0x10"):
        reply = raw_exchange(server, f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{server.server_address[1]}\r\n"
                                     "X-Restore-Page: 1\r\n"
                                     f"Content-Length: {length}\r\n\r\nabc".encode())
        assert reply.startswith(b"HTTP/1.1 40") and b"malformed Content-Length" in reply, (length, reply)


def test_declared_sizes_are_refused_before_decoding(models, tmp_path):
    server = start_custom(models, max_pixels=40_000)
    try:
        kept = set(server.root.iterdir())
        status, reply = request(server, "POST", "/api/jobs", png_claiming(12000, 12000))
        assert status == 413 and "12000x12000" in error_of(reply) and "--max-pixels" in error_of(reply)
        status, reply = request(server, "POST", "/api/jobs", png_claiming(65535, 65535))
        assert status == 413 and "safely" in error_of(reply) and "0x0" not in error_of(reply)
        status, reply = request(server, "POST", "/api/jobs", png(torch.rand(3, 256, 256)))
        assert status == 413 and "256x256" in error_of(reply)
        media.write_video(tmp_path / "v.mp4", data.toy_videos(1, 13, 64, 64, seed=1)[0], fps=12)  # 53 k pixels
        status, reply = request(server, "POST", "/api/jobs", (tmp_path / "v.mp4").read_bytes())
        assert status == 413 and "13 frames" in error_of(reply)
        media.write_video(tmp_path / "s.mp4", data.toy_videos(1, 5, 64, 64, seed=1)[0], fps=12)  # 20 k: taken
        assert request(server, "POST", "/api/jobs?steps=1", (tmp_path / "s.mp4").read_bytes())[0] == 202
        truncated = png(torch.rand(3, 32, 32))[:300]
        status, reply = request(server, "POST", "/api/jobs", truncated)
        assert status == 400 and "PNG image that cannot be decoded" in error_of(reply)
        assert len(set(server.root.iterdir()) - kept) == 1  # only the accepted upload
    finally:
        stop_server(server)


def avi_with_header_count(path: Path, frames: int, claimed: int) -> None:
    """An AVI of `frames` frames whose headers (avih dwTotalFrames, strh dwLength) claim `claimed`."""
    import struct

    container = av.open(str(path), "w", format="avi")
    stream = container.add_stream("mpeg4", rate=12)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 3 % 255, np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    body = bytearray(path.read_bytes())
    avih = body.index(b"avih")
    body[avih + 8 + 16:avih + 8 + 20] = struct.pack("<I", claimed)
    strh = body.index(b"strh")
    body[strh + 8 + 32:strh + 8 + 36] = struct.pack("<I", claimed)
    path.write_bytes(bytes(body))


def test_the_frame_count_is_counted_not_trusted(server, tmp_path):
    import av as pyav

    avi_with_header_count(tmp_path / "lies.avi", 40, claimed=10)
    with pyav.open(str(tmp_path / "lies.avi")) as container:
        assert container.streams.video[0].frames == 10  # what the header says
    assert media.probe_video(tmp_path / "lies.avi").frames == 40
    status, reply = request(server, "POST", "/api/jobs", (tmp_path / "lies.avi").read_bytes())
    assert status == 400 and "more than 17 frames" in error_of(reply)
    avi_with_header_count(tmp_path / "short.avi", 9, claimed=100)
    assert media.probe_video(tmp_path / "short.avi").frames == 9
    assert media.read_video(tmp_path / "short.avi").frames.shape[1] == 9


def test_cross_site_requests_are_refused(server):
    image = png(torch.rand(3, 16, 16))
    status, reply = request(server, "POST", "/api/jobs", image, {"Content-Type": "text/plain"}, page=False)
    assert status == 403 and "X-Restore-Page" in error_of(reply)  # a form or no-cors fetch of another page
    status, reply = request(server, "POST", "/api/jobs", image, {"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in error_of(reply)
    status, reply = request(server, "GET", "/api/jobs", headers={"Host": f"evil.example:{server.server_address[1]}"})
    assert status == 403 and "answers to" in error_of(reply)  # DNS rebinding: the listing stays private
    port = server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert request(server, "GET", "/api/jobs", headers={"Host": host})[0] == 200
    same = {"Origin": f"http://127.0.0.1:{port}"}
    assert request(server, "POST", "/api/jobs?steps=1", image, same)[0] == 202


def test_idle_connections_time_out_and_their_number_is_capped(models):
    server = start_custom(models, timeout=0.5, max_connections=2)
    try:
        idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(2)]
        time.sleep(0.1)
        with socket.create_connection(server.server_address[:2], timeout=10) as third:
            assert third.recv(100) == b""  # over the cap: closed at once
        started = time.time()
        for sock in idle:
            assert sock.recv(100) == b""  # closed by the server once idle for its timeout
            sock.close()
        assert time.time() - started < 5
        time.sleep(0.1)
        assert request(server, "GET", "/api/info")[0] == 200  # slots are free again
    finally:
        stop_server(server)


def test_the_queue_and_the_storage_are_bounded_at_upload(models):
    server = start_custom(models, max_queue=2)
    release = hold_worker(server)
    try:
        image = png(torch.rand(3, 32, 32))
        first = upload(server, image, steps=1)
        queued = [upload(server, image, steps=1) for _ in range(2)]
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("POST", "/api/jobs", body=image, headers={"X-Restore-Page": "1"})
        response = conn.getresponse()
        assert response.status == 503 and response.getheader("Retry-After") == "60"
        assert "waiting already" in error_of(response.read())
        conn.close()
        server.jobs.max_bytes = serve.folder_bytes(server.root) + len(image) // 2  # no room for one more upload
        server.jobs.max_queue = 10
        status, reply = request(server, "POST", "/api/jobs", image)
        assert status == 507 and "storage" in error_of(reply)
        assert serve.folder_bytes(server.root) <= server.jobs.max_bytes
        release.set()
        for job in [first] + queued:
            assert wait(server, job["id"])["state"] == "done"
    finally:
        release.set()
        stop_server(server)


def test_finished_records_expire_with_their_files(models):
    server = start_custom(models, max_records=2)
    try:
        ids = [wait(server, upload(server, png(torch.rand(3, 16, 16)), steps=1)["id"])["id"] for _ in range(4)]
        listed = [job["id"] for job in json.loads(request(server, "GET", "/api/jobs")[1])["jobs"]]
        assert listed == ids[2:]
        assert not (server.root / ids[0]).exists() and (server.root / ids[3]).exists()
        assert request(server, "GET", f"/api/jobs/{ids[0]}")[0] == 404
    finally:
        stop_server(server)


def test_stop_cancels_the_queued_jobs_without_starting_them(models):
    server = start_custom(models)
    release = hold_worker(server)
    started = []
    run = server.jobs._run
    server.jobs._run = lambda job: (started.append(job.id), run(job))[1]
    try:
        jobs = [upload(server, png(torch.rand(3, 16, 16)), steps=1) for _ in range(3)]
        time.sleep(0.2)
        threading.Timer(0.3, release.set).start()
        assert server.jobs.stop(timeout=30)
        states = {job["id"]: server.jobs.jobs[job["id"]].state for job in jobs}
        assert [states[job["id"]] for job in jobs[1:]] == ["cancelled", "cancelled"]
        assert started == [jobs[0]["id"]]
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        shutil.rmtree(server.root)


def test_a_killed_servers_folder_is_removed_at_the_next_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{serve.TEMP_PREFIX}{dead.pid}-abc123"
    alive = tmp_path / f"{serve.TEMP_PREFIX}{os.getpid()}-def456"
    other = tmp_path / "restore-serve-notours"
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / "upload").write_bytes(b"a user's photo")
    assert serve.remove_stale_folders(tmp_path) == [stale]
    assert not stale.exists() and alive.exists() and other.exists()


def test_a_full_disk_is_507_with_a_plain_message(server, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server.jobs, "submit", full)
    status, reply = request(server, "POST", "/api/jobs", png(torch.rand(3, 16, 16)))
    assert status == 507 and error_of(reply) == serve.DISK_FULL


@pytest.mark.slow
def test_soak_mixed_clients_for_a_minute(tmp_path):
    """serve.py in its own process; four clients for 60 s: good images, garbage, declared bombs, oversized
    bodies, cancellations. The worker stays alive, every good job is done at the end, peak RSS < 1.5 GB."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "serve.py", "--preset", "tiny", "--port", "0", "--max-upload-mb",
                                "1", "--max-queue", "64"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("serving on"):
            line = process.stderr.readline()
            assert line
        threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
        host, port = line.split()[2][7:-1].split(":")
        target = types_namespace(server_address=(host, int(port)))
        good, cancelled, failures = [], [], []
        deadline = time.time() + 60

        def client(kind):
            generator = torch.Generator().manual_seed(len(kind))
            while time.time() < deadline:
                try:
                    if kind == "good":
                        status, reply = request(target, "POST", "/api/jobs?steps=1",
                                                png(torch.rand(3, 16, 16, generator=generator)))
                        if status == 202:  # a user waits for the result before the next upload
                            good.append(wait(target, json.loads(reply)["id"], timeout=300)["state"])
                        elif status != 503:
                            failures.append(reply)
                    elif kind == "garbage":
                        request(target, "POST", "/api/jobs", os.urandom(2000))
                        request(target, "POST", "/api/jobs", png_claiming(12000, 12000))
                    elif kind == "oversized":
                        try:  # refused from its Content-Length: the server closes while the body is on its way
                            request(target, "POST", "/api/jobs", b"\0" * (1 << 20 | 1))
                        except (BrokenPipeError, ConnectionResetError):
                            pass
                        request(target, "POST", "/api/jobs", png(torch.rand(3, 16, 16))[:200])
                    else:
                        status, reply = request(target, "POST", "/api/jobs?steps=50", png(torch.rand(3, 32, 32)))
                        if status == 202:
                            job = json.loads(reply)["id"]
                            request(target, "POST", f"/api/jobs/{job}/cancel")
                            cancelled.append(wait(target, job, timeout=300)["state"])
                except (ConnectionError, OSError) as err:
                    failures.append(repr(err))

        threads = [threading.Thread(target=client, args=(kind,)) for kind in ("good", "garbage", "oversized", "cancel")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
        assert len(good) > 10 and set(good) == {"done"}, good
        assert cancelled and set(cancelled) <= {"cancelled", "done"}, cancelled
        peak_kb = int(next(line for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                           if line.startswith("VmHWM")).split()[1])
        print(f"soak: {len(good)} good jobs done, {len(cancelled)} cancelled, peak RSS {peak_kb / 1024:.0f} MiB")
        assert peak_kb < 1.5 * 2**20, f"peak RSS {peak_kb / 2**20:.2f} GiB"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def types_namespace(**kwargs):
    import types

    return types.SimpleNamespace(**kwargs)


# ---------------------------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: NUL-terminated
    JSON on file descriptors 3 and 4), so no WebSocket library is needed."""

    def __init__(self, profile: Path):
        to_browser, self.write_fd = (high_fd(fd) for fd in os.pipe())
        self.read_fd, from_browser = (high_fd(fd) for fd in os.pipe())
        null = high_fd(os.open(os.devnull, os.O_WRONLY))
        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                "about:blank"]
        self.pid = os.posix_spawn(CHROMIUM, argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, to_browser, 3), (os.POSIX_SPAWN_DUP2, from_browser, 4),
            (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)])
        for fd in (to_browser, from_browser, null):
            os.close(fd)
        self.reader = os.fdopen(self.read_fd, "rb")
        self.next_id, self.session = 0, None

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        buffer = b""
        while True:
            byte = self.reader.read(1)
            assert byte, "chromium closed the pipe"
            if byte != b"\0":
                buffer += byte
                continue
            reply, buffer = json.loads(buffer), b""
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str, width: int = 1100, height: int = 1000) -> None:
        """Attach to the browser's page, size its viewport and load `url`."""
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.reader.close()
        os.close(self.write_fd)


def high_fd(fd: int) -> int:
    """`fd` moved to a number above 10 (close-on-exec), so that placing the pipes on 3 and 4 clobbers neither."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)")
def test_browser_drops_an_image_and_sees_it_restored(models, tmp_path):
    server = start_server(models)  # its own server: the page lists every job the server has
    (tmp_path / "photo.png").write_bytes(png(data.toy_images(1, 96, 128, seed=4)[0]))
    (tmp_path / "notes.txt").write_text("not a picture\n" * 20)
    browser = Browser(tmp_path / "profile")
    try:
        host, port = server.server_address[:2]
        browser.open(f"http://{host}:{port}/")
        for _ in range(200):
            if browser.evaluate("document.querySelectorAll('#image-prompt option').length") == 2:
                break
            time.sleep(0.05)
        browser.evaluate("document.getElementById('steps').value = 4")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(tmp_path / "notes.txt")])
        for _ in range(200):
            if browser.evaluate("document.getElementById('error').textContent"):
                break
            time.sleep(0.05)
        assert "notes.txt: the upload is neither an image nor a video" in browser.evaluate(
            "document.getElementById('error').textContent")
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(tmp_path / "photo.png")])
        for _ in range(1200):
            if browser.evaluate("!!document.querySelector('.job.done .compare img.after')?.complete"):
                break
            time.sleep(0.1)
        assert browser.evaluate("document.querySelector('.job .name').textContent") == "photo.png"
        assert browser.evaluate("document.querySelector('.job .state').textContent") == "done"
        assert browser.evaluate("document.querySelector('.job.done .compare img.after').naturalWidth") == 128
        assert browser.evaluate("document.querySelector('a.download').download") == "photo_restored.png"
        assert browser.evaluate("document.getElementById('error').textContent") == ""  # a new upload clears it
        time.sleep(0.5)
        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
        stop_server(server)
    picture = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert picture.shape[:2] == (1000, 1100) and picture.std() > 10  # a rendered page, not a blank one
    if os.environ.get("SERVE_SCREENSHOT"):
        Path(os.environ["SERVE_SCREENSHOT"]).write_bytes(shot)


def test_the_page_offers_every_shipped_prompt_by_name_and_words_it_takes():
    """The image miniature served as a user starts it: auto, each of its bank's prompts by name, all, none; its
    text box suggests a word of its vocabulary, which text prompting then accepts."""
    spec, folder = backbone.resolve("flux")
    bb = backbone.load(spec.name, folder)
    files = restore.prompt_files([], spec, folder)
    model = serve.make_model(bb, files, bank=folder / "prompts" / estimator.BANK_NAME)
    offered = model.describe()["prompts"]
    assert offered[0] == "auto" and {"none", "all"} <= set(offered)
    assert set(model.bank.names) <= set(offered) and {"haze", "lowlight", "snow"} <= set(offered)
    assert model.t0s["noise"] == 0.1 and model.t0s["haze"] == defaults.T0  # each at its own trained T0
    assert model.text and model.text_example == "clean"
    model.velocity("text", model.text_example)  # accepted: no RequestError
