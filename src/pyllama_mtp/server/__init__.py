"""An OpenAI-compatible HTTP server with continuous batching and MTP.

    pyllama-mtp serve -m model.gguf --parallel 4

or from Python: :func:`serve` (blocking), :class:`Server` (in a background thread, for
embedding and tests), :func:`create_app` (the ASGI app over your own :class:`Engine`).
Needs the ``server`` extra: ``pip install 'pyllama_mtp[server]'``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional

from ..answer import check_chat_template
from ..model import Model
from .app import create_app
from .engine import Engine, QueueFullError
from .protocol import Limits

__all__ = ["Engine", "Limits", "QueueFullError", "Server", "create_app", "serve"]

logger = logging.getLogger(__name__)


def _model_name(path: str) -> str:
    name = os.path.basename(path)
    return name[:-5] if name.endswith(".gguf") else name


class Server:
    """A model, its engine and an HTTP server (uvicorn) running in a background thread.

    ``port=0`` picks a free port (see :attr:`url`). Engine options (``parallel``,
    ``n_ctx``, ``n_draft``, ``adaptive``, ``mtp``, ``queue_size``, ``n_threads``, ...) are
    :class:`Engine`'s. ``close()`` (or leaving ``with``) stops it.
    """

    def __init__(self, model_path: str, *, host: str = "127.0.0.1", port: int = 8080,
                 api_key: Optional[str] = None, alias: Optional[str] = None, n_gpu_layers: int = -1,
                 limits: Optional[Limits] = None, log_level: str = "warning", **engine_options: Any) -> None:
        import uvicorn  # the server extra

        self.model = Model.load(model_path, n_gpu_layers=n_gpu_layers, load_mtp=engine_options.get("mtp", True))
        try:
            check_chat_template(self.model)
            self.engine = Engine(self.model, **engine_options)
        except BaseException:
            self.model.close()
            raise
        self.app = create_app(self.engine, model_name=alias or _model_name(model_path), api_key=api_key,
                              limits=limits)
        config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._uvicorn.run, name="pyllama-mtp-http", daemon=True)
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                self.close()
                raise OSError("the HTTP server did not start (is the port in use?)")
            self._thread.join(0.05)
        return self

    def run(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C)."""
        try:
            self._uvicorn.run()
        finally:
            self.close()

    @property
    def url(self) -> str:
        host, port = self._uvicorn.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.engine.close()
        self.model.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(model_path: str, **options: Any) -> None:
    """Load ``model_path`` and serve it until interrupted (see :class:`Server`)."""
    server = Server(model_path, log_level=options.pop("log_level", "info"), **options)
    logger.info("serving %s", model_path)
    server.run()
