"""What travels between the runner and its workers, and the errors the caller sees.

A message is a list of ZMQ frames: ``[meta, body, *buffers]``.

- ``meta``: a small pickled tuple, ``(kind, request_id, rank, *extra)``; always decodable, so a
  worker can answer a request whose body it cannot unpickle.
- ``body``: the object (payload, result, stream event, error info), pickled with protocol 5.
- ``buffers``: the body's large binary parts sent out of band, one frame each, never base64:
  numpy arrays natively, torch tensors (any dtype, bf16 included; always moved to CPU) and PIL
  images through `_Pickler.reducer_override`.

Kinds, runner -> worker: ``call`` (meta extra: streaming flag), ``cancel``, ``stop``.
Worker -> runner: ``ready`` / ``setup_error`` (request id 0), ``result``, ``error``, ``event``
(meta extra: the worker's ``as_text_event`` flag and ``image_format``).

Text events (`to_text_event`) are the one place binary data becomes text: SSE frames
``b"data: <json>\\n\\n"`` in fal.distributed's shape (images and tensors as dicts with a base64
data URL).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import sys
from typing import Any

PROTOCOL = 5
_OUT_OF_BAND_MIN = 4096  # smaller buffers stay in the body frame (one frame is cheaper than two)

Frames = list  # list of bytes-like objects (bytes, memoryview, zmq.Frame)


# ---------------------------------------------------------------- errors the caller sees


class RemoteError(RuntimeError):
    """An exception raised on a worker rank, re-raised in the caller.

    `rank` is the failing rank, `exc_type` the qualified name of the exception's class and
    `remote_traceback` the traceback formatted on that rank (also part of ``str(error)``).
    """

    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str, note: str = ""):
        self.rank = rank
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback.rstrip()
        self.note = note
        text = f"rank {rank} raised {exc_type}: {message}"
        if note:
            text += f"\n{note}"
        super().__init__(f"{text}\n\nRemote traceback (rank {rank}):\n{self.remote_traceback}")

    def with_note(self, note: str) -> RemoteError:
        """A copy of this error with `note` appended to its message."""
        return RemoteError(self.rank, self.exc_type, self.message, self.remote_traceback, note)


class WorkerDied(RuntimeError):
    """A worker process exited while the runner needed it; `rank` and `exitcode` say which and how."""

    def __init__(self, rank: int, exitcode: int | None):
        self.rank = rank
        self.exitcode = exitcode
        how = f"exit code {exitcode}" if exitcode is None or exitcode >= 0 else f"killed by signal {-exitcode}"
        super().__init__(f"worker rank {rank} died ({how}); call `await runner.restart()` to respawn all ranks")


class RequestCancelled(Exception):
    """A worker stops a request its caller gave up: raise it when
    `DistributedWorker.cancel_requested` says so (on every rank, as they all get the same answer)."""


class RunnerBroken(RuntimeError):
    """The runner lost a rank or has ranks stuck in a collective; `await runner.restart()` fixes it
    (with ``auto_restart=True``, the default, the runner restarts the ranks itself)."""


class RanksStuck(RunnerBroken):
    """Some ranks had not finished a request `collective_timeout` seconds after another rank
    returned: they wait in a collective the others never entered (or compute for that long).

    `ranks` lists them; `stacks` maps each to its Python stack at that moment (innermost frame
    first, as `faulthandler` dumps it), also summarised in ``str(error)``.
    """

    def __init__(self, message: str, ranks: list[int], stacks: dict[int, str]):
        super().__init__(message)
        self.ranks = ranks
        self.stacks = stacks


# ---------------------------------------------------------------- binary encoding


def _rebuild_tensor(buffer: Any, dtype_name: str, shape: tuple[int, ...]) -> Any:
    import torch

    dtype = getattr(torch, dtype_name)
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dtype)
    if not isinstance(buffer, bytearray):  # in-band bytes are read-only; frombuffer needs writable memory
        buffer = bytearray(buffer)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _rebuild_image(buffer: Any, mode: str, size: tuple[int, int], info: dict) -> Any:
    from PIL import Image

    image = Image.frombytes(mode, size, buffer)
    image.info.update(info)
    return image


def _reduce_tensor(tensor: Any) -> tuple:
    import torch

    cpu = tensor.detach().to("cpu").contiguous()
    flat_bytes = cpu.reshape(-1).view(torch.uint8).numpy()  # same memory, byte view
    dtype_name = str(cpu.dtype).removeprefix("torch.")
    return _rebuild_tensor, (pickle.PickleBuffer(flat_bytes), dtype_name, tuple(cpu.shape))


_PLAIN_IMAGE_MODES = {"1", "L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F", "I;16"}


class _Pickler(pickle.Pickler):
    """Pickle protocol 5 that sends tensors and images as out-of-band buffers."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")  # no torch imported -> no tensors to see
        if torch is not None and isinstance(obj, torch.Tensor):
            return _reduce_tensor(obj)
        pil = sys.modules.get("PIL.Image")
        if pil is not None and isinstance(obj, pil.Image) and obj.mode in _PLAIN_IMAGE_MODES:
            info = {k: v for k, v in obj.info.items() if isinstance(v, (str, int, float, bytes))}
            return _rebuild_image, (pickle.PickleBuffer(obj.tobytes()), obj.mode, obj.size, info)
        return NotImplemented


def encode(obj: Any) -> Frames:
    """``[body, *buffers]`` for `obj`; raises `TypeError` naming what cannot be pickled."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < _OUT_OF_BAND_MIN:
            return True  # in band
        buffers.append(buf)
        return False

    try:
        _Pickler(stream, protocol=PROTOCOL, buffer_callback=out_of_band).dump(obj)
    except Exception as exc:  # PicklingError, TypeError ("cannot pickle '_thread.lock'"), AttributeError
        raise TypeError(f"{_unpicklable_part(obj)} cannot be sent between processes: {exc}") from exc
    return [stream.getbuffer(), *(buf.raw() for buf in buffers)]


def decode(frames: Frames) -> Any:
    """The object `encode` turned into `frames` (zmq frames, bytes or memoryviews)."""
    body, *buffers = (_as_buffer(frame) for frame in frames)
    # Out-of-band buffers become writable memory the rebuilt arrays/tensors own (zmq frames are read-only).
    return pickle.loads(body, buffers=[bytearray(buf) for buf in buffers])


def _as_buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _unpicklable_part(obj: Any) -> str:
    """'payload["fn"]' style path to the first value that fails to pickle (for error messages)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            try:
                encode(value)
            except TypeError:
                return f"value of key {key!r} ({type(value).__name__})"
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            try:
                encode(value)
            except TypeError:
                return f"item {index} ({type(value).__name__})"
    return f"a {type(obj).__name__}"


def pack(meta: tuple, body: Frames | None = None) -> Frames:
    """A message: the pickled `meta` tuple followed by an encoded body (see `encode`)."""
    return [pickle.dumps(meta, protocol=PROTOCOL), *(body or [])]


def unpack(frames: Frames) -> tuple[tuple, Frames]:
    """``(meta, body_frames)`` of a message; the body is decoded separately (it may fail)."""
    return pickle.loads(_as_buffer(frames[0])), frames[1:]


def error_info(exc: BaseException, traceback_text: str) -> tuple[str, str, str]:
    """What a worker sends for an exception: (qualified type name, message, formatted traceback)."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return name, str(exc), traceback_text


# ---------------------------------------------------------------- text events (SSE)

INTERMEDIATE_JPEG_QUALITY = 60
"""JPEG quality of images in stream events (fal.distributed's: previews are small and many)."""
FINAL_JPEG_QUALITY = 95
"""JPEG quality of images in a stream's final result."""


def to_text_event(obj: Any, image_format: str = "jpeg", is_final: bool = False) -> bytes:
    """``b"data: <json>\\n\\n"``: one server-sent event, in fal.distributed's shape.

    A PIL image becomes ``{"content_type": "image/jpeg", "width", "height", "data": null,
    "url": "data:image/jpeg;base64,..."}`` (JPEG quality 60 in events, 95 in the final result;
    `image_format` ``"png"``/``"webp"`` picks that format instead); a tensor or array becomes
    ``{"content_type": "application/tensor"|"application/ndarray", "shape", "dtype", "data": null,
    "url": <base64 of torch.save / numpy.save>}``; bytes become base64 strings.
    """
    body = json.dumps(_jsonable(obj, image_format.lower(), is_final), separators=(",", ":"))
    return f"data: {body}\n\n".encode()


def _jsonable(obj: Any, image_format: str, is_final: bool) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, image_format, is_final) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, image_format, is_final) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(obj, pil.Image):
        return _image_event(obj, image_format, is_final)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _array_event("application/tensor", obj, str(obj.dtype), _torch_save(obj))
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and hasattr(obj, "tobytes"):  # numpy arrays
        return _array_event("application/ndarray", obj, str(obj.dtype), _numpy_save(obj))
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return obj.item()
    raise TypeError(
        f"cannot put a {type(obj).__name__} into a text event; convert it to JSON-compatible data "
        "(or an image/tensor/array/bytes) in the worker, or use stream(..., as_text_events=False)"
    )


def _image_event(image: Any, image_format: str, is_final: bool) -> dict[str, Any]:
    fmt = "jpeg" if image_format in ("jpg", "jpeg") else image_format
    out = io.BytesIO()
    if fmt == "jpeg":
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        rgb.save(out, format="JPEG", quality=FINAL_JPEG_QUALITY if is_final else INTERMEDIATE_JPEG_QUALITY)
    else:
        image.save(out, format=fmt.upper())
    url = f"data:image/{fmt};base64,{base64.b64encode(out.getvalue()).decode('ascii')}"
    return {"content_type": f"image/{fmt}", "width": image.width, "height": image.height, "data": None, "url": url}


def _array_event(content_type: str, value: Any, dtype: str, saved: bytes) -> dict[str, Any]:
    url = f"data:{content_type};base64,{base64.b64encode(saved).decode('ascii')}"
    return {"content_type": content_type, "shape": list(value.shape), "dtype": dtype, "data": None, "url": url}


def _torch_save(tensor: Any) -> bytes:
    import torch

    out = io.BytesIO()
    torch.save(tensor.detach().cpu(), out)
    return out.getvalue()


def _numpy_save(array: Any) -> bytes:
    import numpy as np

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()
