"""The server in a subprocess, for the server tests."""
import re
import subprocess
import sys
import threading
import time

import httpx
import openai

START_TIMEOUT = 120
EOS = 2                        # the tiny models' </s>: banned with logit_bias where answers must be long
NO_EOS = {str(EOS): -100}


class ServerProcess:
    """`python -m alpaca2 serve ... --port 0` in a subprocess; url once it listens."""

    def __init__(self, model_path, *args):
        self.start([sys.executable, "-m", "alpaca2", "serve", "-m", str(model_path), "--port", "0", "-t", "1", *args])

    def start(self, cmd, **popen_kw):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen_kw)
        self.lines = []
        self.url = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the server never answered /health:\n" + "".join(self.lines))
            time.sleep(0.1)

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving .* on (http://\S+)/v1 ", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def client(self, **kw):
        kw.setdefault("api_key", "none")
        kw.setdefault("timeout", 120)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def metrics(self, **headers):
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
