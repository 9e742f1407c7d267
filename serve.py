"""A local web page for restoration: drop an image or a short video on it, watch it restore, compare, download.

    python serve.py                                   # the shipped miniatures, http://127.0.0.1:8000/
    python serve.py --preset tiny --port 0            # tiny random backbones (study, tests), any free port
    python serve.py --flux FLUX.1-dev/ --prompt haze.safetensors --wan Wan2.1-T2V-1.3B/ --host 0.0.0.0

The models are loaded once: the image backbone (FLUX.1 or the image miniature) for images, the video backbone
(Wan2.1 or the video miniature) for videos; with neither --flux nor --wan both miniatures are served (the
video one when it is there), with one of them only that one. One worker thread restores the jobs in the order
they came; the page polls their progress. Standard library only: http.server and one static page, serve.html.

Safety (every request is hostile until checked):
- bound to 127.0.0.1 unless --host says otherwise; on a loopback address the Host header must name it
  (127.0.0.1, localhost, [::1] with the port: no DNS rebinding), and every POST must carry the header
  `X-Restore-Page: 1`, which a page of another origin cannot send without a CORS preflight this server never
  grants (and a browser's Origin, when sent, must be this server's): no cross-site use. `curl` needs
  `-H 'X-Restore-Page: 1'` too;
- uploads larger than --max-upload-mb, or with a malformed or negative Content-Length, are refused before they
  are read; an upload is accepted only when it decodes as an RGB image or a video whose declared size
  (width x height x frames, frames counted from the packets, never the header) is within --max-pixels and
  --max-frames, checked before any pixel is decoded, one decode at a time;
- at most --max-queue jobs wait (503 with Retry-After beyond); the temporary folder is capped at
  --max-storage-mb at upload time (the oldest finished jobs' files are evicted first; 507 when the waiting
  jobs fill it); only the latest --max-records finished jobs are remembered;
- idle or slow connections are closed after --timeout seconds, and at most --max-connections are served at once;
- the uploaded name is a label, never a path; the only files served are the page and the files a job wrote, by
  job id and a fixed name (anything else, `..` included, is 404); every file lives in a private temporary folder
  (0700) removed on exit (and a killed server's, at the next start). Errors are JSON `{"error": "..."}` with a
  4xx/5xx status, shown on the page; no request can stop the server or its worker.
"""

import argparse
import collections
import errno
import json
import os
import queue
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn.functional as F

import backbone as backbones
import bridge
import defaults
import estimator
import media
import restore
import runtime
import streaming
import weights

PAGE = Path(__file__).resolve().parent / "serve.html"
FILE_TYPES = {"input.png": "image/png", "output.png": "image/png", "input.mp4": "video/mp4",
              "output.mp4": "video/mp4", "strip.png": "image/png"}  # the only names a job's files have
STRIP_FRAMES, STRIP_HEIGHT = 8, 96  # a video job's frame strip: frames shown, pixels high per row
FINISHED = ("done", "failed", "cancelled")


class Cancelled(Exception):
    """Raised by a job's progress callback when the job was cancelled: ends its restoration between two steps."""


class RequestError(Exception):
    """A request that cannot be served: its HTTP status, the message the page shows, extra reply headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


DISK_FULL = "the server's disk is full; free some space (or lower --max-storage-mb) and try again"
TEMP_PREFIX = "restore-serve-"  # the private folder: restore-serve-{pid}-{random}, removed on exit


@dataclass
class Model:
    """One loaded backbone and its prompt choices: name -> velocity ("none": the plain model; "all": the
    average of every loaded prompt's velocity), "auto" when it has a prompt bank (the bank's estimator decides
    per input, restore.blind_velocity), and whether text prompting is possible."""

    bb: backbones.Backbone
    velocities: dict
    default: str
    text: bool
    text_cache: Path | None = None
    bank: estimator.Bank | None = None
    t0s: dict = field(default_factory=dict)  # prompt name -> the T0 it was trained at (restore.trained_t0)
    text_example: str = "a sharp, clean photo"  # what the page's text box suggests: words this backbone takes

    def velocity(self, choice: str, words: str):
        if choice == "text":
            if not self.text:
                raise RequestError(400, f"{self.bb.name} has no text prompting")
            if not words.strip():
                raise RequestError(400, "text prompting needs some text")
            try:
                conditioning = restore.text_conditioning(self.bb, words, self.text_cache)
            except ValueError as err:
                raise RequestError(400, str(err)) from None
            return restore.velocity_for(self.bb, (), conditioning)
        if choice not in self.velocities:
            raise RequestError(400, f"unknown prompt {choice!r}; this backbone has {sorted(self.velocities)}")
        return self.velocities[choice]

    def describe(self) -> dict:
        return {"name": self.bb.name, "config": self.bb.config,
                "prompts": (["auto"] if self.bank is not None else []) + list(self.velocities),
                "default": self.default, "text": self.text, "text_example": self.text_example}


def make_model(bb: backbones.Backbone, files: list[Path], text_cache: Path | None = None,
               bank: Path | None = None) -> Model:
    """The prompt choices of `bb` from its prompt files and prompt bank (loaded and checked once, here)."""
    loaded = restore.load_prompts(files, bb)
    modules = [prompt for prompt, _ in loaded]
    velocities = {"none": restore.velocity_for(bb)}
    for path, prompt in zip(files, modules):
        velocities[path.stem] = restore.velocity_for(bb, [prompt])
    t0s = {path.stem: restore.trained_t0([meta]) for path, (_, meta) in zip(files, loaded)}
    if len(modules) > 1:
        velocities["all"] = restore.velocity_for(bb, modules)
        t0s["all"] = restore.trained_t0([meta for _, meta in loaded])
    try:
        restore.check_text_prompting(bb.spec)
        text = True
    except ValueError:
        text = False
    example = Model.text_example
    if text and bb.spec.source == "miniature":  # a miniature's words come from the vocabulary it records
        vocabulary = json.loads((Path(bb.folder) / backbones.MINIATURE_FILE).read_text()).get("vocabulary") or {}
        text, example = bool(vocabulary), "clean" if "clean" in vocabulary else next(iter(vocabulary), "")
    loaded_bank = restore.load_bank(bank, bb) if bank is not None else None
    for name, (prompt, meta) in zip(loaded_bank.names if loaded_bank else [], loaded_bank.prompts if loaded_bank else []):
        if name not in velocities:  # each of the bank's prompts is a choice of its own, by its name
            velocities[name] = restore.velocity_for(bb, [prompt])
            t0s[name] = restore.trained_t0([meta])
    default = "auto" if bank is not None else "all" if len(modules) > 1 else files[0].stem if files else "none"
    return Model(bb, velocities, default, text, text_cache, loaded_bank, t0s, example)


@dataclass
class Job:
    id: str
    kind: str  # "image" or "video"
    label: str  # the uploaded file's name, for the page only (never a path)
    folder: Path  # the job's own folder in the private temp folder
    prompt: str
    text: str
    options: restore.RestoreOptions
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued, running, done, failed, cancelled
    error: str | None = None
    done: int = 0
    total: int = 0
    started: float | None = None
    finished: float | None = None
    files: list = field(default_factory=list)  # names from FILE_TYPES this job wrote
    cancel: bool = False
    decided: str | None = None  # "auto": what the estimator chose, e.g. "haze 0.86, lowlight 0.14"

    def public(self, position: int | None) -> dict:
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        eta = elapsed / self.done * (self.total - self.done) if self.done and self.state == "running" else None
        return {"id": self.id, "kind": self.kind, "label": self.label, "state": self.state, "error": self.error,
                "prompt": self.prompt, "auto": self.decided, "steps": self.options.steps, "t0": self.options.t0,
                "done": self.done, "total": self.total, "elapsed": round(elapsed, 2),
                "eta": None if eta is None else round(eta, 2), "position": position,
                "files": {name: f"/files/{self.id}/{name}" for name in self.files}}


class Jobs:
    """The job queue: jobs restored one at a time, in order, by one worker thread that no job and no upload can
    stop; their files in `root`, whose total size is kept under `max_bytes` (uploads reserve their size before
    they are read; the oldest finished jobs' files are evicted to make room); at most `max_queue` jobs wait and
    the latest `max_records` finished jobs are remembered."""

    def __init__(self, models: dict, root: Path, max_bytes: int, max_frames: int,
                 max_pixels: int = defaults.MAX_PIXELS, max_queue: int = 16, max_records: int = 200):
        self.models, self.root, self.max_bytes, self.max_frames = models, root, max_bytes, max_frames
        self.max_pixels, self.max_queue, self.max_records = max_pixels, max_queue, max_records
        self.jobs: dict[str, Job] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.decoding = threading.Lock()  # one upload decoded at a time: memory bounded by one --max-pixels input
        self.reserved = 0  # bytes of uploads being received (counted against max_bytes)
        self.stopping = False
        self.pending: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="restore-worker", daemon=True)
        self.worker.start()

    # -- requests

    def admit(self, length: int) -> None:
        """Make room for an upload of `length` bytes before it is read, or refuse it: 503 when the queue is full
        or the server stops, 507 when the waiting jobs' files leave no room under the storage cap."""
        with self.lock:
            waiting = sum(job.state == "queued" for job in self.jobs.values())
            if self.stopping or waiting >= self.max_queue:
                raise RequestError(503, "the server is shutting down" if self.stopping else
                                   f"{waiting} jobs are waiting already (--max-queue); try again in a minute",
                                   {"Retry-After": "60"})
            self._evict_locked(length)
            if folder_bytes(self.root) + self.reserved + length > self.max_bytes:
                raise RequestError(507, f"the upload ({length / 2**20:.1f} MiB) does not fit the server's storage "
                                   f"(--max-storage-mb {self.max_bytes / 2**20:.0f}) beside the waiting jobs' files",
                                   {"Retry-After": "60"})
            self.reserved += length

    def release(self, length: int) -> None:
        """An admitted upload was received (or failed): its bytes now count as files, or not at all."""
        with self.lock:
            self.reserved -= length

    def submit(self, upload: Path, label: str, prompt: dict, words: str, options: restore.RestoreOptions,
               t0: float | None = None) -> Job:
        """Check an upload (already in its job folder as `upload`) by decoding it and queue its job; `prompt`:
        the choice for each kind ({"image": "haze", "video": None}; None: the model's default); `t0`: the
        request's bridge T0 (None: the prompt's trained T0, per input for "auto", else the backbone's, Spec.t0)."""
        with self.decoding:
            kind, pixels = self._decode(upload)
        model = self.models[kind]
        prompt = prompt.get(kind) or model.default
        options = replace(options, t0=(model.t0s.get(prompt) or model.bb.spec.t0) if t0 is None else t0,
                          prompt_t0=t0 is None)
        if prompt == "text":
            if not model.text:
                raise RequestError(400, f"{model.bb.name} has no text prompting")
            if not words.strip():
                raise RequestError(400, "text prompting needs some text")
        elif prompt not in model.velocities and not (prompt == "auto" and model.bank is not None):
            raise RequestError(400, f"unknown prompt {prompt!r}; {model.bb.name} has {model.describe()['prompts']}")
        job = Job(upload.parent.name, kind, label, upload.parent, prompt, words, options)
        if kind == "image":
            media.write_image(job.folder / "input.png", pixels)
            job.files.append("input.png")
        with self.lock:  # its place in the queue and its time stamp together: `created` orders the jobs
            if self.stopping:
                raise RequestError(503, "the server is shutting down", {"Retry-After": "60"})
            job.created = time.time()
            self.jobs[job.id] = job
            self.pending.put(job.id)
        return job

    def _decode(self, upload: Path) -> tuple[str, torch.Tensor | None]:
        """("image", pixels [3, H, W]) or ("video", None) by what the bytes are, each size checked from the header
        before any pixel is decoded; 400 / 413 otherwise."""
        try:
            pixels = media.read_image(upload, max_pixels=self.max_pixels)
        except ValueError as err:
            image_error = str(err).replace(str(upload), "the upload")
        else:
            if "image" not in self.models:
                raise RequestError(400, "this server restores videos only (no image backbone loaded)")
            if min(pixels.shape[-2:]) < defaults.SIZE_MULTIPLE:
                raise RequestError(400, f"the image is {media.hw_text(pixels)}; the smallest size that can be "
                                   f"restored is {defaults.SIZE_MULTIPLE}x{defaults.SIZE_MULTIPLE}")
            return "image", pixels
        if "cannot read this image file" not in image_error:  # an image, but not one to restore: say why
            raise RequestError(413 if "--max-pixels" in image_error or "safely" in image_error else 400, image_error)
        try:
            info = media.probe_video(upload, max_frames=self.max_frames)
        except ValueError as err:
            reason = str(err).replace(str(upload) + ": ", "")
            raise RequestError(400, f"the upload is neither an image nor a video that can be decoded ({reason})") \
                from None
        if "video" not in self.models:
            raise RequestError(400, "this server restores images only (no video backbone loaded)")
        if info.frames > self.max_frames:
            raise RequestError(400, f"the video has more than {self.max_frames} frames; this server takes at most "
                               f"{self.max_frames} (--max-frames)")
        try:
            media.check_decoded_size("the video", info.width, info.height, self.max_pixels, info.frames)
        except ValueError as err:
            raise RequestError(413, str(err)) from None
        if min(info.height, info.width) < defaults.SIZE_MULTIPLE:
            raise RequestError(400, f"the video is {info.height}x{info.width} (HxW); the smallest size that can "
                               f"be restored is {defaults.SIZE_MULTIPLE}x{defaults.SIZE_MULTIPLE}")
        return "video", None

    def cancel(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise RequestError(404, "no such job")
            if job.state == "queued":
                job.state, job.finished = "cancelled", time.time()
            job.cancel = True
            return job

    def listing(self) -> list[dict]:
        with self.lock:
            places, position = {}, 0
            for job in self.jobs.values():
                if job.state == "queued":
                    position += 1
                    places[job.id] = position
            return [job.public(places.get(job.id)) for job in self.jobs.values()]

    def status(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise RequestError(404, "no such job")
            if job.state != "queued":
                return job.public(None)
            return job.public(1 + sum(other.state == "queued" and other.created < job.created
                                      for other in self.jobs.values()))

    def file(self, job_id: str, name: str) -> Path:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or name not in job.files:
                raise RequestError(404, "no such file")
            return job.folder / name

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel every job (queued ones are marked so and never started; the running one stops at its next
        step) and wait up to `timeout` s for the worker. Returns whether it has ended."""
        with self.lock:
            self.stopping = True
            for job in self.jobs.values():
                job.cancel = True
                if job.state == "queued":
                    job.state, job.finished = "cancelled", time.time()
        self.pending.put(None)
        self.worker.join(timeout=timeout)
        return not self.worker.is_alive()

    # -- the worker

    def _work(self) -> None:
        while (job_id := self.pending.get()) is not None:
            try:
                self._one(self.jobs.get(job_id))
            except Exception as err:  # nothing may end the worker; what went wrong is said on stderr
                print(f"serve.py: worker: {type(err).__name__}: {err}", file=sys.stderr)

    def _one(self, job: "Job | None") -> None:
        with self.lock:
            if job is None or job.state != "queued":
                return
            job.state, job.started = "running", time.time()
        try:
            self._run(job)
            state, error = "done", None
        except Cancelled:
            state, error = "cancelled", None
        except (ValueError, RequestError, weights.CheckpointError) as err:
            state, error = "failed", str(err).replace(str(job.folder), "the job")
        except OSError as err:
            state, error = "failed", DISK_FULL if err.errno == errno.ENOSPC else f"cannot write the result ({err})"
        except Exception as err:  # a bug must not stop the worker: the job fails and says why
            state, error = "failed", f"internal error: {type(err).__name__}: {err}"
        with self.lock:
            job.state, job.error, job.finished = state, error, time.time()
            self._evict_locked(0)
            self._forget_locked()

    def _run(self, job: Job) -> None:
        model = self.models[job.kind]
        velocity = model.velocity(job.prompt, job.text) if job.prompt != "auto" else None

        def decide(degraded: torch.Tensor) -> tuple[bridge.VelocityFn, restore.RestoreOptions]:
            if velocity is not None:
                return velocity, job.options
            chosen, decided = restore.blind_velocity(model.bb, model.bank, degraded)
            job.decided = estimator.describe_weights(decided)
            job.options = restore.decided_options(model.bank, decided, job.options)  # (its T0 shows on the page)
            return chosen, job.options

        def progress(done: int, total: int) -> None:
            check_cancel()
            job.done, job.total = done, total

        def check_cancel() -> None:  # between steps, and between decoding, encoding and writing
            if job.cancel:
                raise Cancelled

        job.total = job.options.steps
        if job.kind == "image":
            image = media.read_image(job.folder / "input.png")
            chosen, options = decide(image)
            check_cancel()
            restored = restore.restore_image(model.bb, chosen, image, options, progress)
            check_cancel()
            media.write_image(job.folder / "output.png", restored)
            job.files.append("output.png")
            return
        upload = job.folder / "upload"
        video = media.read_video(upload, max_pixels=self.max_pixels)
        check_cancel()
        length, starts = restore.chunk_plan(video.frames.shape[1], job.options.chunk_frames, job.options.chunk_overlap)
        job.total = len(starts) * job.options.steps
        media.write_video(job.folder / "input.mp4", video.frames, video.fps)
        job.files.append("input.mp4")
        chosen, options = decide(video.frames[:, :length])  # auto: decided on the first chunk, as sample.py does
        check_cancel()
        restored = restore.restore_video(model.bb, chosen, video.frames, options, progress)
        check_cancel()
        media.write_video(job.folder / "output.mp4", restored, video.fps, audio_from=upload if video.has_audio else None)
        media.write_image(job.folder / "strip.png", frame_strip(video.frames, restored))
        job.files += ["output.mp4", "strip.png"]

    def _evict_locked(self, room: int) -> None:
        """(Holding the lock.) Delete the oldest finished jobs' files (never the latest one's) until the folder
        has `room` bytes free under its cap; their records stay, saying so."""
        finished = sorted((job for job in self.jobs.values() if job.state in FINISHED and job.folder.exists()),
                          key=lambda job: job.finished)
        for job in finished[:-1]:
            if folder_bytes(self.root) + self.reserved + room <= self.max_bytes:
                return
            shutil.rmtree(job.folder, ignore_errors=True)
            job.files = []
            job.error = ((job.error or "") + " (files evicted: the server's storage cap was reached)").strip()

    def _forget_locked(self) -> None:
        """(Holding the lock.) Drop the oldest finished jobs beyond the latest `max_records`, files and all."""
        finished = sorted((job for job in self.jobs.values() if job.state in FINISHED), key=lambda job: job.finished)
        for job in finished[:max(0, len(finished) - self.max_records)]:
            shutil.rmtree(job.folder, ignore_errors=True)
            del self.jobs[job.id]


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder`; files and folders that vanish during the walk count nothing
    (os.walk skips a folder it cannot list)."""
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except OSError:
                continue
    return total


def remove_stale_folders(temp: Path = Path(tempfile.gettempdir())) -> list[Path]:
    """Remove the private folders of servers that were killed (TEMP_PREFIX{pid}-..., that pid no longer
    running, the folder ours); returns them."""
    removed = []
    for folder in temp.glob(f"{TEMP_PREFIX}*-*"):
        found = re.fullmatch(re.escape(TEMP_PREFIX) + r"(\d+)-\w+", folder.name)
        if not found or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(found.group(1)), 0)
            continue  # that server is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def frame_strip(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Up to STRIP_FRAMES evenly spaced frames of two videos [3, F, H, W]: input above, output below, each
    frame STRIP_HEIGHT pixels high -> [3, 2 * STRIP_HEIGHT, n * width]."""
    count = before.shape[1]
    shown = min(count, STRIP_FRAMES)
    picks = [round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)]
    height, width = before.shape[-2:]
    size = (STRIP_HEIGHT, max(1, round(width * STRIP_HEIGHT / height)))

    def row(video: torch.Tensor) -> torch.Tensor:
        frames = video[:, picks].permute(1, 0, 2, 3)  # [n, 3, H, W]
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
        return torch.cat(list(frames), dim=-1)

    return torch.cat([row(before), row(after)], dim=-2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- HTTP


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # the Host names a loopback server answers to


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, jobs: Jobs, root: Path, max_upload: int, quiet: bool = False,
                 timeout: float = 30.0, max_connections: int = 32):
        super().__init__(address, Handler)
        self.jobs, self.root, self.max_upload, self.quiet = jobs, root, max_upload, quiet
        self.connection_timeout = timeout
        self.connections = threading.BoundedSemaphore(max_connections)
        host, port = self.server_address[:2]
        self.hosts = None  # any Host: bound to a network address on purpose
        if host == "::1" or host.startswith("127."):  # loopback: only the names this server is reached by
            names = {*LOOPBACK_NAMES, host}
            self.hosts = {f"{name}:{port}" for name in names} | (names if port == 80 else set())

    def process_request(self, request, client_address) -> None:
        """At most `max_connections` at once: one more is closed at once (its client retries later)."""
        if not self.connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address) -> None:  # a broken connection: logged, the server goes on
        if not self.quiet:
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "restore-serve"
    sys_version = ""
    body_read = False  # whether the current request's body was read (or it has none)

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout  # every read and write: an idle or slow client is dropped
        super().setup()

    def log_message(self, format, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def log_request(self, code="-", size="-") -> None:
        """Only what changes something or fails is logged: not the page's progress polls."""
        if self.command != "GET" or not str(code).startswith("2"):
            super().log_request(code, size)

    def send_error(self, code, message=None, explain=None) -> None:
        """Every error (the standard library's own too: a malformed request line, 501) as JSON."""
        self.close_connection = True
        self.reply(code, {"error": message or HTTPStatus(code).phrase})

    def reply(self, status: int, body: dict | bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def route(self, method: str) -> None:
        """Answer one request; a body nothing reads (any but an accepted upload's) closes the connection after
        the reply, so that its bytes are never taken for the next request."""
        self.body_read = self.headers.get("Content-Length", "0") == "0" and "Transfer-Encoding" not in self.headers
        try:
            self.check_origin(method)
            url = urllib.parse.urlsplit(self.path)
            parts = urllib.parse.unquote(url.path).split("/")[1:]
            query = urllib.parse.parse_qs(url.query)
            jobs = self.server.jobs
            if method == "GET" and parts == [""]:
                self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif method == "GET" and parts == ["api", "info"]:
                self.reply(200, self.info())
            elif method == "GET" and parts == ["api", "jobs"]:
                self.reply(200, {"jobs": jobs.listing()})
            elif method == "POST" and parts == ["api", "jobs"]:
                self.reply(202, self.upload(query))
            elif method == "GET" and len(parts) == 3 and parts[:2] == ["api", "jobs"]:
                self.reply(200, jobs.status(parts[2]))
            elif method == "POST" and len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
                jobs.cancel(parts[2])
                self.reply(200, jobs.status(parts[2]))
            elif method == "GET" and len(parts) == 3 and parts[0] == "files" and parts[2] in FILE_TYPES:
                self.reply(200, jobs.file(parts[1], parts[2]).read_bytes(), FILE_TYPES[parts[2]])
            else:
                raise RequestError(404, f"not found: {url.path[:200]}")
        except RequestError as err:
            self.close_connection |= not self.body_read
            self.reply(err.status, {"error": str(err)}, headers=err.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # a full disk answers 507; a bug 500; the server goes on
            self.close_connection = True
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                self.reply(507, {"error": DISK_FULL})
            else:
                self.reply(500, {"error": f"internal error: {type(err).__name__}: {err}"})
        finally:
            self.close_connection |= not self.body_read

    def check_origin(self, method: str) -> None:
        """403 for a request another site's page could have sent: a Host this loopback server is not (DNS
        rebinding), a POST without the page's header (a form or a no-cors fetch cannot set it), or a foreign Origin."""
        host = self.headers.get("Host", "")
        if self.server.hosts is not None and host not in self.server.hosts:
            raise RequestError(403, f"this server answers to {', '.join(sorted(self.server.hosts))}, not Host "
                               f"{host[:100]!r}")
        if method == "POST" and self.headers.get("X-Restore-Page") != "1":
            raise RequestError(403, "a POST needs the header 'X-Restore-Page: 1' (the page sends it)")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise RequestError(403, f"requests from {origin[:100]!r} are not taken (another site)")

    def info(self) -> dict:
        jobs = self.server.jobs
        return {"models": {kind: model.describe() for kind, model in jobs.models.items()},
                "defaults": {"steps": defaults.STEPS, "t0": {kind: m.bb.spec.t0 for kind, m in jobs.models.items()}},
                "max_upload": self.server.max_upload, "max_frames": jobs.max_frames}

    def upload(self, query: dict) -> dict:
        """POST /api/jobs?name=&image_prompt=&video_prompt=&text=&steps=&t0= with the file's bytes as the body (what the page's
        fetch sends): the bytes go to a fresh job folder under a fixed name, are checked, the job is queued."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            raise RequestError(411, "the upload needs a Content-Length")
        if not length.isdigit():  # int() would take "-1", " 12" and "1_000"
            raise RequestError(400, "a malformed Content-Length")
        length = int(length)
        if length > self.server.max_upload:
            raise RequestError(413, f"the upload is {length / 2**20:.1f} MiB; this server takes at most "
                               f"{self.server.max_upload / 2**20:.1f} MiB (--max-upload-mb)")
        if length == 0:
            raise RequestError(400, "the upload is empty")
        options, t0 = request_options(query)
        self.server.jobs.admit(length)
        folder = self.server.root / secrets.token_hex(8)
        upload = folder / "upload"
        try:
            folder.mkdir(mode=0o700)
            with upload.open("wb") as out:
                left = length
                while left:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        raise RequestError(400, "the upload ended before its Content-Length")
                    out.write(chunk)
                    left -= len(chunk)
            self.body_read = True
            job = self.server.jobs.submit(upload, first(query, "name", "upload")[:200],
                                          {k: first(query, f"{k}_prompt", None) for k in ("image", "video")},
                                          first(query, "text", "")[:500], options, t0)
            if job.kind == "image":
                upload.unlink()  # the decoded pixels are kept as input.png
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            self.server.jobs.release(length)
        return job.public(None)


def first(query: dict, key: str, default):
    return query[key][0] if key in query else default


def request_options(query: dict) -> tuple[restore.RestoreOptions, float | None]:
    """The sampler settings a request asks for (steps; t0, None when absent or empty: the prompt's trained T0, else
    the backbone's, known once the upload is decoded) checked before the body is read; 400 for a malformed or invalid one."""
    try:
        steps = int(first(query, "steps", defaults.STEPS))
        given = first(query, "t0", "")
        t0 = float(given) if given else None
        if not steps <= 1000:
            raise ValueError(f"at most 1000 steps, got {steps}")
        return restore.RestoreOptions(steps=steps, t0=defaults.T0 if t0 is None else t0), t0
    except ValueError as err:
        raise RequestError(400, f"bad settings: {err}") from None


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (as in sample.py)")
    g.add_argument("--flux", type=Path, help="FLUX.1 snapshot folder or an image miniature's folder (default: mini/)")
    g.add_argument("--wan", type=Path, help="Wan2.1-T2V snapshot folder or a video miniature's (default: mini/wan/ "
                   "when it is there)")
    g.add_argument("--preset", choices=["tiny"], help="tiny random backbones: study and tests, no weights")
    g.add_argument("--prompt", action="append", default=[], metavar="FILE", help="learned prompt file for the "
                   "backbone of its kind (repeatable); with a miniature also a shipped prompt's name. Default: a "
                   "miniature's shipped prompts; each is a choice on the page, with 'all' (their average) and 'none'")
    g.add_argument("--bank", type=Path, action="append", default=[], metavar="FILE", help="prompt bank "
                   "(estimator.py) for the 'auto' choice of the backbone of its kind (default: a miniature's "
                   f"prompts/{estimator.BANK_NAME} when it ships one); 'auto' is then the page's default")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], help="DiT dtype (default: bfloat16 on GPU, float32 on "
                   "CPU)")
    g.add_argument("--threads", type=int, help="CPU threads (default: the CPUs not kept busy by other work, from "
                   "the load average: oversubscribed threads made a restoration 1.6-10x slower)")
    g.add_argument("--text-cache", type=Path, default=runtime.TEXT_CACHE, help="cache of text-encoder outputs "
                   "(default: %(default)s)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                   "only; 0.0.0.0 opens the page to the network)")
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port)")
    g.add_argument("--max-upload-mb", type=float, default=64, help="largest upload (default: %(default)s MiB)")
    g.add_argument("--max-storage-mb", type=float, default=1024, help="cap of the temporary folder of uploads and "
                   "results; beyond it the oldest finished jobs' files are deleted, all but the latest one's "
                   "(default: %(default)s MiB)")
    g.add_argument("--max-frames", type=int, default=65, help="longest video accepted (default: %(default)s frames)")
    g.add_argument("--max-pixels", type=int, default=defaults.MAX_PIXELS, help="largest upload in decoded pixels, "
                   "width x height x frames, checked from its header before decoding (default: %(default)s: a "
                   "4096x4096 photo, or 18 frames of 1280x720)")
    g.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more are refused with 503 "
                   "(default: %(default)s)")
    g.add_argument("--max-records", type=int, default=200, help="finished jobs remembered; older ones are "
                   "forgotten with their files (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=30, help="seconds an idle or slow connection is kept "
                   "(default: %(default)s)")
    g.add_argument("--max-connections", type=int, default=32, help="connections served at once (default: "
                   "%(default)s)")
    args = p.parse_args(argv)
    if args.preset is not None and (args.flux or args.wan):
        p.error("--preset tiny is a backbone of its own; it does not go with --flux/--wan")
    if min(args.max_upload_mb, args.max_storage_mb, args.timeout) <= 0 or min(
            args.max_frames, args.max_pixels, args.max_queue, args.max_records, args.max_connections) < 1:
        p.error("the limits must be positive")
    return args


def choose_backbones(args: argparse.Namespace) -> dict:
    """{"image"|"video": (spec, folder)} before anything is loaded: both kinds unless only one of --flux/--wan
    is given; the shipped video miniature only when it is there and describes itself."""
    chosen = {}
    for kind, key, folder in (("image", "flux", args.flux), ("video", "wan", args.wan)):
        if (args.flux or args.wan) and folder is None:
            continue
        try:
            spec, where = backbones.resolve(key, folder, args.preset)
            if spec.source == "miniature":
                backbones.miniature_kind(where)
        except ValueError as err:
            if folder is None and args.preset is None and kind == "video":
                print(f"serve.py: note: no videos ({err})", file=sys.stderr)
                continue
            raise
        chosen[kind] = spec, where
    return chosen


def prompts_of(args: argparse.Namespace, chosen: dict) -> dict:
    """{kind: [prompt files]}: each --prompt file goes to the backbone kind it was trained for (its metadata),
    a bare name to the miniatures that ship a prompt of that name; nothing given: a miniature's shipped ones."""
    files = {}
    for kind, (spec, folder) in chosen.items():
        mine = []
        for name in args.prompt:
            path = Path(name)
            if path.is_file():
                if weights.read_metadata(path).get("backbone") == spec.kind:
                    mine.append(name)
            elif len(chosen) == 1 or (spec.source == "miniature" and (folder / "prompts" / f"{name}.safetensors")
                                      .is_file()):
                mine.append(name)  # one backbone: prompt_files says what is wrong with a missing one
        if args.prompt and not mine:
            files[kind] = []
            continue
        files[kind] = restore.prompt_files(mine, spec, folder)
    used = {Path(f).stem for kind_files in files.values() for f in kind_files}
    unused = [name for name in args.prompt if Path(name).stem not in used]
    if unused:
        raise ValueError(f"--prompt {unused[0]}: no loaded backbone ({', '.join(s.name for s, _ in chosen.values())}) "
                         "takes it (not a prompt file of its kind, nor a shipped prompt's name)")
    return files


def banks_of(args: argparse.Namespace, chosen: dict) -> dict:
    """{kind: prompt bank file or None}: each --bank goes to the backbone kind its prompts were trained for; a
    miniature without one gets its shipped bank when there is one."""
    banks = {kind: None for kind in chosen}
    for path in args.bank:
        kind = next((k for k, (spec, _) in chosen.items()
                     if estimator.load_bank(path).prompts[0][1]["backbone"] == spec.kind), None)
        if kind is None or banks[kind] is not None:
            raise ValueError(f"--bank {path}: " + ("a second bank for the same backbone" if kind else
                                                   "its prompts are for none of the loaded backbones"))
        banks[kind] = path
    for kind, (spec, folder) in chosen.items():
        shipped = folder / "prompts" / estimator.BANK_NAME if spec.source == "miniature" else None
        if banks[kind] is None and shipped is not None and shipped.is_file():
            banks[kind] = shipped
    return banks


def stop_on_signal(signum, frame) -> None:
    """SIGTERM stops the server as Ctrl-C does: serve_forever ends and the cleanup runs."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = None
    try:
        chosen = choose_backbones(args)
        files, banks = prompts_of(args, chosen), banks_of(args, chosen)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        runtime.set_threads(args.threads)
        dtype = runtime.default_dtype(device, args.dtype)
        models = {}
        for kind, (spec, folder) in chosen.items():
            bb = backbones.load(spec.name, folder, dtype, device, args.text_cache,
                                restore.needs_text_encoders(files[kind]))
            models[kind] = make_model(bb, files[kind], args.text_cache, banks[kind])
            print(f"{kind}s: {bb.name} ({bb.config}), prompts: {', '.join(models[kind].describe()['prompts'])}"
                  + (f" (auto: {banks[kind]})" if banks[kind] else "") + (", text" if models[kind].text else ""),
                  file=sys.stderr)
        for stale in remove_stale_folders():
            print(f"serve.py: removed {stale} (left by a server that was killed)", file=sys.stderr)
        root = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
        jobs = Jobs(models, root, int(args.max_storage_mb * 2**20), args.max_frames, args.max_pixels,
                    args.max_queue, args.max_records)
        server = Server((args.host, args.port), jobs, root, int(args.max_upload_mb * 2**20), timeout=args.timeout,
                        max_connections=args.max_connections)
    except (ValueError, FileNotFoundError, OSError, weights.CheckpointError) as err:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        sys.exit(f"serve.py: error: {err}")
    signal.signal(signal.SIGTERM, stop_on_signal)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port}/  (Ctrl-C stops; files in {root}, removed on exit)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        ended = jobs.stop()
        shutil.rmtree(root, ignore_errors=True)
        if not ended:  # the worker is inside a long encode or decode: leave without waiting for it (exit 0)
            print("serve.py: stopped during a restoration; its job is dropped", file=sys.stderr)
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    main()
