"""`ditmesh serve`: an HTTP server (FastAPI + uvicorn) in front of a `DistributedRunner`.

    ditmesh serve --model tiny-flux --parallel ulysses=2 --port 8000
    curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
        -d '{"prompt": "a cat", "height": 128, "width": 128, "steps": 4, "seed": 0}'

Routes: ``POST /v1/images/generations`` (JSON; or server-sent events with
``Accept: text/event-stream`` or ``"stream": true``), ``GET /healthz``, ``GET /metrics``
(Prometheus), ``/docs`` (OpenAPI). Requests are checked here (pydantic, then the model's size
multiple) before anything reaches a rank, wait first-come first-served for the one mesh
(`MeshQueue`; 429 when full), and a dead rank fails only the request in flight (503) while the
ranks restart. In Python::

    from ditmesh import DistributedRunner, DiffusionWorker
    from ditmesh.serve import ServeSettings, run_server

    runner = DistributedRunner(DiffusionWorker, world_size=2, device_type="cpu", num_threads=1)
    run_server(runner, {"model": "tiny-flux", "parallel": "ulysses=2"}, ServeSettings(max_queue=16), port=8000)
"""

from ditmesh.serve.app import ServeSettings, create_app
from ditmesh.serve.queue import MeshQueue
from ditmesh.serve.server import run_server

__all__ = ["MeshQueue", "ServeSettings", "create_app", "run_server"]
