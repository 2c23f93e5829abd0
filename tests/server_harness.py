"""Start a real ComfyUI server (subprocess, 127.0.0.1 only) with this pack loaded, and talk to it over HTTP.

The pack is loaded from outside the ComfyUI tree: ComfyUI imports every folder inside each
`custom_nodes` location of an extra_model_paths.yaml, by folder name. A temporary folder
holds a symlink `comfyui_redi -> <pack>`, so the module name does not depend on what the
clone directory is called. Models, knowledge bases, input, output, temp and user data all
live in a temporary work directory, and the database is in memory, so nothing lands in the
ComfyUI tree.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_NAME = "comfyui_redi"
# Safety nets, not performance checks: a busy 2-core machine can take minutes to start a server
# or answer a request; the waits below poll and return as soon as the server is ready.
START_TIMEOUT_S = 1800.0
HTTP_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Layout:
    """The temporary folders a test server uses."""

    root: Path
    pack_link: Path
    checkpoints: Path
    redi_kb: Path
    input: Path
    output: Path
    temp: Path
    user: Path
    config: Path
    log: Path


def prepare_layout(root: Path, pack_dir: Path, checkpoints: dict[str, Path], with_pack: bool = True) -> Layout:
    """Create the work directory: models (checkpoint symlinks), redi_kb, the pack link and the YAML.

    checkpoints: file name under models/checkpoints -> the file it links to. with_pack=False
    leaves custom_nodes empty: the same server without this pack (a baseline to compare with).
    """
    root = Path(root)
    nodes_dir = root / "custom_nodes"
    models = root / "models"
    lay = Layout(root=root, pack_link=nodes_dir / PACK_NAME, checkpoints=models / "checkpoints", redi_kb=models / "redi_kb",
                 input=root / "input", output=root / "output", temp=root / "temp", user=root / "user",
                 config=root / "extra_model_paths.yaml", log=root / "server.log")
    for d in (nodes_dir, lay.checkpoints, lay.redi_kb, lay.input, lay.output, lay.temp, lay.user):
        d.mkdir(parents=True, exist_ok=True)
    if with_pack and not lay.pack_link.exists():
        lay.pack_link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    for name, target in checkpoints.items():
        link = lay.checkpoints / name
        if not link.exists():
            link.symlink_to(Path(target).resolve())
    # Plain YAML written by hand (every value is an absolute path; json.dumps quotes them safely).
    lines = [
        "redi_e2e:",
        f"  base_path: {json.dumps(str(root))}",
        "  checkpoints: models/checkpoints",
        "  redi_kb: models/redi_kb",
        f"  custom_nodes: {json.dumps(str(nodes_dir))}",
    ]
    lay.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lay


class ServerError(RuntimeError):
    pass


# Linux: the server asks for SIGTERM when the test process dies (PR_SET_PDEATHSIG survives exec), so a
# killed pytest leaves no server behind even when no finally block runs. Done in a fresh interpreter
# that then execs main.py, because subprocess's preexec_fn is unsafe once torch has started threads.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except Exception:\n"
    "    pass\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


@dataclass
class ComfyServer:
    """One ComfyUI server process; use `start()` and always `stop()` (e.g. in a fixture's finally)."""

    comfy_root: Path
    layout: Layout
    python: str = sys.executable
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        lay = self.layout
        launcher = [self.python, "-c", _LAUNCHER] if sys.platform.startswith("linux") else [self.python]
        return [
            *launcher, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(lay.config),
            "--output-directory", str(lay.output), "--input-directory", str(lay.input),
            "--temp-directory", str(lay.temp), "--user-directory", str(lay.user),
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT_S, attempts: int = 3) -> "ComfyServer":
        """Start and wait until /object_info answers; a port taken meanwhile by someone else is retried."""
        pick_port = not self.port
        for attempt in range(attempts):
            if pick_port:
                self.port = free_port()
            try:
                return self._start_once(timeout)
            except ServerError as e:
                if not (pick_port and attempt + 1 < attempts and "address already in use" in str(e).lower()):
                    raise

    def _start_once(self, timeout: float) -> "ComfyServer":
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "2")
        with open(self.layout.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy_root), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting.\n{self.log_tail()}")
            try:
                self.get("/object_info/CheckpointLoaderSimple", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.layout.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return "--- server log (tail) ---\n" + self.log_text()[-chars:]

    # ------------------------------------------------------------------ HTTP

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(f"ComfyUI is not running (exit code {code}).\n{self.log_tail()}")

    def get(self, path: str, timeout: float = HTTP_TIMEOUT_S):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = HTTP_TIMEOUT_S):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} answered {e.code}: {e.read().decode('utf-8', 'replace')[:4000]}") from e
        return json.loads(body) if body else None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        """Submit an API-format prompt; return its prompt id (raises with the validation errors)."""
        self._check_alive()
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ServerError(f"prompt refused: {json.dumps(answer['node_errors'])[:4000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float) -> dict:
        """Poll /history/<id> until the prompt finished (bounded); return its history entry."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            self._check_alive()
            entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            if entry is not None:  # ComfyUI adds a prompt to the history when it has finished (or failed)
                return entry
            if time.monotonic() > deadline:
                try:
                    self.post("/interrupt", {})
                except Exception:  # noqa: BLE001 - best effort before failing
                    pass
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def run_collecting_texts(self, prompt: dict, timeout: float) -> tuple[dict, list[tuple[str, str]]]:
        """Run a prompt while listening on the server's websocket, as the page does.

        Returns its history entry and the progress texts (node id, text) the server sent, the
        binary message the front end draws on a node (server.send_progress_text).
        """
        import websocket  # websocket-client, pinned with the browser test's requirements

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            entry = self.run(prompt, timeout)
            texts = []
            ws.settimeout(2.0)  # the messages of a finished prompt are already in the socket
            while True:
                try:
                    opcode, data = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    break
                if opcode == websocket.ABNF.OPCODE_BINARY and len(data) > 8 and int.from_bytes(data[:4], "big") == 3:
                    n = int.from_bytes(data[4:8], "big")  # event 3: [node id length][node id][text]
                    texts.append((data[8:8 + n].decode("utf-8"), data[8 + n:].decode("utf-8")))
            return entry, texts
        finally:
            ws.close()

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue a prompt and wait for it; raise with the error messages and the log if it failed."""
        prompt_id = self.queue(prompt)
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            raise ServerError(f"prompt {prompt_id} failed: {json.dumps(errors)[:4000]}\n{self.log_tail()}")
        return entry


@contextlib.contextmanager
def server_for_prompts(comfy_root: Path, root: Path, pack_dir: Path, prompts, checkpoint: Path):
    """A started ComfyServer whose every checkpoint name in the API prompts links to `checkpoint`; stopped on exit."""
    names = {node["inputs"]["ckpt_name"] for prompt in prompts for node in prompt.values()
             if node["class_type"] == "CheckpointLoaderSimple"}
    srv = ComfyServer(Path(comfy_root), prepare_layout(root, pack_dir, {n: checkpoint for n in names}))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
