"""A real ComfyUI server with this pack: headless, CPU, on a free loopback port, driven over HTTP.

    with ComfyServer(testbed, base_dir) as server:
        prompt_id = server.post_prompt({"1": {"class_type": "NextScaleSchedule", "inputs": {...}}})
        entry = server.wait_history(prompt_id)
        server.output_texts(entry), server.output_images(entry)

The server is started as ``python main.py --cpu --listen 127.0.0.1 --port N --base-directory BASE
--database-url sqlite:///:memory: --disable-auto-launch`` and stopped by its own pid. Its output goes to a log file
that is kept (``server.log_path``) for failure reports.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .testbed import PACK_NAME, REPO_ROOT, Testbed

if TYPE_CHECKING:
    from typing_extensions import Self

TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class ServerError(RuntimeError):
    """The server did not start, died, or did not answer in time. The message ends with the log's tail."""


class PromptRejected(Exception):
    """``POST /prompt`` answered 400: ``error`` is the top-level error, ``node_errors`` the per-node ones."""

    def __init__(self, status: int, body: dict[str, Any]):
        self.status = status
        self.body = body
        self.error = body.get("error", {})
        self.node_errors = body.get("node_errors", {})
        super().__init__(f"prompt rejected ({status}): {json.dumps(body, indent=1)[:4000]}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base_dir: Path, pack_dir: Path = REPO_ROOT, pack_name: str = PACK_NAME) -> Path:
    """A ComfyUI ``--base-directory``: the pack symlinked into custom_nodes, the tutorial marked as done."""
    base_dir = Path(base_dir)
    (base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / pack_name
    if not link.is_symlink() or Path(os.readlink(link)) != Path(pack_dir):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(pack_dir, target_is_directory=True)
    settings = base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    if not settings.exists():
        # A fresh user dir would open the Templates browser first in the frontend.
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    for sub in ("input", "output", "temp", "models"):
        (base_dir / sub).mkdir(exist_ok=True)
    # Images the example workflows load (LoadImage) ship in workflows/input/.
    for image in sorted((Path(pack_dir) / "workflows" / "input").glob("*")):
        target = base_dir / "input" / image.name
        if image.is_file() and not target.exists():
            shutil.copyfile(image, target)
    return base_dir


class ComfyServer:
    def __init__(
        self,
        testbed: Testbed,
        base_dir: Path,
        *,
        pack_dir: Path = REPO_ROOT,
        pack_name: str = PACK_NAME,
        env: dict[str, str] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        log_path: Path | None = None,
    ):
        self.testbed = testbed
        self.base_dir = Path(base_dir)
        self.pack_dir = Path(pack_dir)
        self.pack_name = pack_name
        self.env_overrides = dict(env or {})
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.testbed.python), "main.py",
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
            *self.extra_args,
        ]

    def start(self, timeout: float = 240.0) -> Self:
        prepare_base(self.base_dir, self.pack_dir, self.pack_name)
        env = dict(os.environ)
        # Nothing from the test process leaks into the server's imports (pytest's sys.path, a user's PYTHONPATH).
        env.pop("PYTHONPATH", None)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"})
        env.update(self.env_overrides)
        for attempt in range(3):
            self.port = free_port()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    self.command(), cwd=self.testbed.comfy_dir, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            atexit.register(self.stop)  # never leave a server behind, even if the caller forgets
            try:
                self._wait_ready(timeout)
                self.startup_s = time.monotonic() - t0
                return self
            except ServerError:
                self.stop()
                if attempt < 2 and "address already in use" in self.log_text().lower():
                    continue  # another process took the port between free_port() and bind
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"ComfyUI exited with code {self.proc.returncode} during start-up" + self.log_report()
                )
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise ServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s" + self.log_report())

    def stop(self, timeout: float = 20.0) -> int | None:
        """Terminate the server by its pid (SIGTERM, then SIGKILL after ``timeout``)."""
        atexit.unregister(self.stop)
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_report(self, lines: int = 80) -> str:
        return (
            f"\n--- ComfyUI log ({self.log_path}), last {lines} lines ---\n{self.log_tail(lines)}\n--- end of log ---"
        )

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> Any:
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> {status}: {str(body)[:2000]}")
        return body

    def post(self, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``/object_info`` (every node) or the definition of one node class (``{}`` when unknown)."""
        if node_class is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{urllib.parse.quote(node_class)}").get(node_class, {})

    def post_prompt(
        self, prompt: dict[str, Any], client_id: str | None = None, extra_data: dict[str, Any] | None = None
    ) -> str:
        """Queue an API-format prompt; returns its prompt_id, raises :class:`PromptRejected` on HTTP 400."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id or f"nextscale-test-{uuid.uuid4().hex[:8]}"}
        if extra_data:
            body["extra_data"] = extra_data
        status, answer = self.post("/prompt", body)
        if status == 200:
            return answer["prompt_id"]
        if isinstance(answer, dict):
            raise PromptRejected(status, answer)
        raise ServerError(f"POST /prompt -> {status}: {str(answer)[:2000]}" + self.log_report(30))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait_history(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict[str, Any]:
        """Wait until ``/history/<prompt_id>`` has the finished prompt; returns its entry (status, outputs)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # ComfyUI adds the entry when the prompt has finished
                return entry
            if not self.alive:
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}" + self.log_report())
            if time.monotonic() > deadline:
                raise ServerError(
                    f"prompt {prompt_id} not finished after {timeout:.0f} s; queue: {self.get('/queue')}"
                    + self.log_report()
                )
            time.sleep(poll)

    def run_prompt(self, prompt: dict[str, Any], timeout: float = 120.0, **kwargs) -> dict[str, Any]:
        """Post, wait, and return the history entry."""
        return self.wait_history(self.post_prompt(prompt, **kwargs), timeout=timeout)

    def interrupt(self) -> None:
        status, body = self.post("/interrupt")
        if status != 200:
            raise ServerError(f"POST /interrupt -> {status}: {body}")

    def queue(self) -> dict[str, Any]:
        return self.get("/queue")

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def status_of(entry: dict[str, Any]) -> str:
        return entry.get("status", {}).get("status_str", "")

    @staticmethod
    def error_messages(entry: dict[str, Any]) -> list[Any]:
        """The ``execution_error`` / ``execution_interrupted`` messages of a history entry (for assertion messages)."""
        return [m for m in entry.get("status", {}).get("messages", []) if m[0] != "execution_start"]

    def output_images(self, entry: dict[str, Any], node: str | None = None) -> list[Path]:
        """Image files listed in the outputs of a history entry (output, temp or input folder of the base dir), of
        every node or of one node id."""
        folders = {"output": "output", "temp": "temp", "input": "input"}
        files = []
        outputs = entry.get("outputs", {})
        for node_id, node_out in outputs.items():
            if node is not None and node_id != str(node):
                continue
            for img in node_out.get("images", []):
                folder = self.base_dir / folders.get(img.get("type", "output"), "output")
                files.append(folder / img.get("subfolder", "") / img["filename"])
        return files

    @staticmethod
    def output_texts(entry: dict[str, Any]) -> dict[str, list[str]]:
        """``{node_id: [text, ...]}`` for nodes that showed text (``ui.PreviewText`` / ``{"text": [...]}``)."""
        return {nid: out["text"] for nid, out in entry.get("outputs", {}).items() if "text" in out}

    def events(self, client_id: str | None = None, preview_metadata: bool = False):
        """A websocket :class:`~harness.ws_events.EventCollector` for ``client_id`` (use as a context manager)."""
        from .ws_events import EventCollector

        return EventCollector(self.url, client_id=client_id, preview_metadata=preview_metadata)
