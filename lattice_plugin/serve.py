"""``lattice serve``: litgpt's LitServe server (``litgpt serve``) on Lattice checkpoints.

litgpt's ``run_server`` builds one of its LitAPI classes and a ``LitServer`` from ``litgpt.deploy.serve``'s globals;
:func:`patch_litgpt_server` rebinds them to the subclasses below, so that

- LitServe's inference worker, a *spawned* process that imports litgpt afresh, patches litgpt before its ``setup``
  loads the model through ``litgpt.api.LLM`` (an unpatched litgpt cannot read a Lattice ``model_config.yaml``);
- the checkpoint must be a local directory (litgpt would try to download a missing one from the Hugging Face Hub);
- the server listens on ``LATTICE_SERVE_HOST`` (default ``127.0.0.1``; litgpt's listens on every interface).
"""

import os
from pathlib import Path
from typing import Any

import litgpt.deploy.serve as litgpt_serve
from litgpt.constants import _LITSERVE_AVAILABLE

from lattice_plugin.checkpoint import validate_checkpoint
from lattice_plugin.errors import LatticeError

HOSTS = ("127.0.0.1", "0.0.0.0", "::")


def serve_host() -> str:
    """The address to listen on, from ``LATTICE_SERVE_HOST`` (loopback unless asked otherwise)."""
    host = os.environ.get("LATTICE_SERVE_HOST", "127.0.0.1")
    if host not in HOSTS:
        raise LatticeError(f"LATTICE_SERVE_HOST must be one of {', '.join(HOSTS)} (LitServe's choices), got {host!r}")
    return host


def local_checkpoint_dir(model_name: str | Path, access_token: str | None = None, **kwargs: Any) -> Path:
    """Stands in for litgpt's ``auto_download_checkpoint``: the directory itself, if its weights match a readable
    model config and it holds a tokenizer (Lattice checkpoints are made locally, so nothing is downloaded). Checked here, in
    the server's process, because a failure in LitServe's inference worker ends the server with two tracebacks."""
    checkpoint_dir = Path(model_name)
    validate_checkpoint(checkpoint_dir, tokenizer=True)
    return checkpoint_dir


class LatticeLitAPI:
    """Mixed into litgpt's LitAPI classes: one device (litgpt's multi-device strategies read ``lit_model.pth`` with
    ``torch.load`` outside ``load_checkpoint``), and litgpt patched in the worker process before the model loads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.devices != 1 or self.generate_strategy is not None:
            raise LatticeError("lattice serve runs the model on one device: use --devices 1 and no --generate_strategy")

    def setup(self, device: str) -> None:
        from lattice_plugin.patch import patch_litgpt

        patch_litgpt()
        super().setup(device)


class SimpleLitAPI(LatticeLitAPI, litgpt_serve.SimpleLitAPI):
    """litgpt's default spec: ``POST /predict`` with ``{"prompt": ...}`` returns ``{"output": ...}``."""


class StreamLitAPI(LatticeLitAPI, litgpt_serve.StreamLitAPI):
    """litgpt's default spec, streamed (``--stream true``): one ``{"output": ...}`` per token."""


class OpenAISpecLitAPI(LatticeLitAPI, litgpt_serve.OpenAISpecLitAPI):
    """The OpenAI-compatible spec (``--openai_spec true``): ``POST /v1/chat/completions``, plain or streamed."""


class LitServer(litgpt_serve.LitServer):
    """LitServe's server, listening on :func:`serve_host` (litgpt's ``run_server`` passes no host)."""

    def run(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("host", serve_host())
        super().run(*args, **kwargs)


def patch_litgpt_server() -> None:
    """Rebind ``litgpt.deploy.serve``'s globals to the classes above (and fail in one line without LitServe)."""
    if not _LITSERVE_AVAILABLE:
        raise LatticeError("lattice serve needs LitServe: pip install 'lattice-plugin[serve]'")
    serve_host()  # a bad LATTICE_SERVE_HOST fails before the model loads
    litgpt_serve.auto_download_checkpoint = local_checkpoint_dir
    litgpt_serve.SimpleLitAPI, litgpt_serve.StreamLitAPI = SimpleLitAPI, StreamLitAPI
    litgpt_serve.OpenAISpecLitAPI, litgpt_serve.LitServer = OpenAISpecLitAPI, LitServer
