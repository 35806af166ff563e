"""Which model a transform uses, what identifies it, and the models loaded in this process.

A :class:`ModelHandle` names a model three ways: an in-memory object, a local path, or a Hub id (``None``:
``$GEMMA_RVQ_MODEL`` or :data:`DEFAULT_MODEL`). It gives

- a small, stable **identity** (for ``datasets``' cache fingerprint): a digest of an object's state dict
  (computed once per handle) or of a folder's weight files (once per file state and process), or the
  Hub id and the commit its revision points to in the local cache;
- a **load spec** (pickled in place of the weights) from which another process gets the same model: a
  forked ``num_proc`` worker finds an in-memory model in ``_MEMORY_MODELS`` by digest, a path or Hub id is
  loaded once per (reference, device, dtype) and process into ``_LOADED_MODELS``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ik/speechless-twi-stage1-rvq-gemma4"
"""The model :data:`gemma_rvq.tokenize_speech` loads when ``$GEMMA_RVQ_MODEL`` is not set."""

MODEL_ENV_VAR = "GEMMA_RVQ_MODEL"
"""Environment variable naming the default model (a Hub id or a local folder)."""

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".joblib", ".pkl", ".npy", ".npz")

# In-memory models by weights digest. A pickled handle carries only the digest; a worker forked from this
# process (datasets' num_proc on Linux) finds the model here without any copy or reload.
_MEMORY_MODELS: weakref.WeakValueDictionary[str, torch.nn.Module] = weakref.WeakValueDictionary()
# Models loaded from a path / Hub id (or copies of in-memory ones on another device / dtype), per process.
_LOADED_MODELS: dict[tuple, torch.nn.Module] = {}
_LOAD_LOCK = threading.Lock()
# Models that finished one encode call in this process (their lazy state exists; concurrent calls are safe).
_WARM_MODELS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


# ---------------------------------------------------------------------------------------------- digests
def _hasher():
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:  # pragma: no cover
        import hashlib

        return hashlib.blake2b(digest_size=16)


def state_dict_digest(model: torch.nn.Module) -> str:
    """Digest of a module's class, config and every state-dict tensor (names, dtypes, shapes, bytes).

    About 1-3 GB/s on one CPU core; a :class:`ModelHandle` computes it once.
    """
    h = _hasher()
    h.update(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_PATH_DIGESTS: dict[tuple, str] = {}


def path_digest(path: str | os.PathLike) -> str:
    """Digest of the weight and config files under ``path`` (a file or a checkpoint folder).

    Cached per process on (path, file names, sizes, modification and change times, inodes), so it is
    read once per file state.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(_WEIGHT_SUFFIXES) and "/.cache/" not in os.path.join(root, name)
        )
    else:
        files = [path]
    # ctime and inode too: a file rewritten with its old size and modification time still changes them
    stat_key = (path, tuple((f, (st := os.stat(f)).st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for f in files))
    if stat_key in _PATH_DIGESTS:
        return _PATH_DIGESTS[stat_key]
    h = _hasher()
    for f in files:
        h.update(os.path.relpath(f, path).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    _PATH_DIGESTS[stat_key] = digest = h.hexdigest()
    return digest


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision points to in the local cache, if it is there (no network)."""
    if revision and _HEX40.match(revision):
        return revision
    try:
        from huggingface_hub import constants

        ref = os.path.join(
            constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"), "refs", revision or "main"
        )
        with open(ref) as fh:
            return fh.read().strip() or None
    except (OSError, ImportError):
        return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def encoder_identity(config: Any) -> dict | None:
    """What identifies the encoder behind a gemma-rvq config, which the RVQ weights alone do not:

    - ``None`` for a bundled encoder (``encoder_config`` set: its weights are in the checkpoint);
    - ``{"digest": ...}`` of the files at a local ``encoder_name_or_path`` (the weights that are loaded);
    - ``{"hub_id", "revision"}`` for a Hub id: the commit its revision points to in the local cache.

    ``config`` is a ``GemmaRVQConfig`` or its dict (``config.json``).
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("encoder_config") is not None:
        return None
    name, revision = get("encoder_name_or_path"), get("encoder_revision")
    if not name:
        return None
    if os.path.exists(name):
        return {"digest": path_digest(name)}
    return {"hub_id": name, "revision": hub_commit(name, revision) or revision or "main"}


def _tensor_versions(model: torch.nn.Module) -> tuple:
    """(name, storage address, in-place version) of every state-dict tensor: it changes whenever a weight
    is modified in place (``copy_``, ``mul_``, ``load_state_dict``, an optimizer step) or replaced."""
    return tuple((name, t.data_ptr(), t._version) for name, t in model.state_dict(keep_vars=True).items())


def same_identity(before: Any, now: Any) -> bool:
    """``now`` is ``before``, or ``before`` with an unpinned Hub revision resolved to its commit (and what
    that resolution reveals, such as the encoder named in the downloaded config)."""
    if before == now:
        return True
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return False
    if "hub_id" in before and before.get("hub_id") == now.get("hub_id") and not _HEX40.match(str(before.get("revision"))):
        return all(same_identity(v, now.get(k)) for k, v in before.items() if k != "revision")
    return before.keys() == now.keys() and all(same_identity(v, now[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- placement
def _dtypes(model: torch.nn.Module) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(quantizer-side dtype, encoder dtype) of ``model`` as it is now; an encoder not loaded yet will be
    loaded in the model's dtype."""
    params = next(model.parameters(), None)
    main = model._param_dtype() if hasattr(model, "_param_dtype") else params.dtype if params is not None else None
    encoder = getattr(model, "encoder", None) or model.__dict__.get("_lazy_encoder")
    encoder_params = next(encoder.parameters(), None) if isinstance(encoder, torch.nn.Module) else None
    return main, encoder_params.dtype if encoder_params is not None else main


def _fits(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None,
          encoder_dtype: torch.dtype | None) -> bool:
    params = next(model.parameters(), None)
    if params is None:
        return True
    main, encoder = _dtypes(model)
    return params.device == device and dtype in (None, main) and encoder_dtype in (None, encoder)


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None,
          encoder_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``model`` in eval mode, frozen, on ``device`` (and in ``dtype`` when given; its encoder then in
    ``encoder_dtype`` when that is given too)."""
    model.eval().requires_grad_(False)
    params = next(model.parameters(), None)
    if params is not None and (params.device != device or (dtype is not None and params.dtype != dtype)):
        model.to(device=device, dtype=dtype)
    if encoder_dtype is not None and hasattr(model, "get_audio_encoder"):
        encoder = model.get_audio_encoder()  # loads a lazy encoder now, in the model's dtype
        if next(encoder.parameters()).dtype != encoder_dtype:
            encoder.to(encoder_dtype)
    return model


def resolve_device(device: str | None, rank: int | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` or a bare ``"cuda"``: GPU ``rank % n_gpus`` when GPUs exist."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        return torch.device(f"cuda:{(rank or 0) % n_gpus}") if n_gpus else torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and n_gpus:
        return torch.device(f"cuda:{(rank or 0) % n_gpus}")
    return resolved


def is_warm(model: torch.nn.Module) -> bool:
    """True once ``model`` finished one encode call in this process (its lazy state is built)."""
    return model in _WARM_MODELS


def mark_warm(model: torch.nn.Module) -> None:
    _WARM_MODELS.add(model)


# ---------------------------------------------------------------------------------------------- the handle
class ModelHandle:
    """A model given as an object, a local path or a Hub id (``None``: the default), for one transform.

    Args:
        model: a ``torch.nn.Module`` (a ``GemmaRVQModel``), a path or Hub id, or ``None``
            (``$GEMMA_RVQ_MODEL`` or :data:`DEFAULT_MODEL`, read when first needed).
        revision: Hub revision of a Hub-id ``model``.
    """

    def __init__(self, model: Any = None, revision: str | None = None) -> None:
        self.model: torch.nn.Module | None = None
        self.ref: str | None = None
        self.revision = revision
        self.memory_key: str | None = None  # set in a process that got this handle by pickle
        self.digest: str | None = None
        self.encoder: dict | None = None  # encoder identity of an in-memory model, computed with the digest
        self._versions: tuple | None = None  # tensor versions when the digest was computed
        self._identity: dict | None = None  # the identity last handed out (what datasets fingerprinted)
        if isinstance(model, torch.nn.Module):
            self.model = model
        elif model is None or isinstance(model, (str, os.PathLike)):
            self.ref = os.fspath(model) if model is not None else None
        else:
            raise TypeError(f"model must be a GemmaRVQModel, a path, a Hub id or None, got {type(model)!r}")

    def __repr__(self) -> str:
        return f"<{type(self.model).__name__}>" if self.model is not None else repr(self.resolved_ref())

    @property
    def in_memory(self) -> bool:
        return self.model is not None or self.memory_key is not None

    def resolved_ref(self) -> str:
        """The path or Hub id to load (the environment's default when none was given)."""
        if self.ref is not None:
            return self.ref
        return os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL

    def identity(self) -> dict:
        """What decides the codes, small and stable:

        - objects: a digest of the state dict (computed once per handle, and again only when a weight
          was changed in place since: tensor versions are compared);
        - local paths: a digest of the checkpoint's files (once per file state and process);
        - Hub ids: the id and the commit the revision points to in the local cache;

        plus, for paths and Hub ids, the encoder behind ``encoder_name_or_path`` when it is not bundled
        (:func:`encoder_identity`: a digest of its files or its cached Hub commit).
        """
        if self.in_memory:
            if self.model is not None and (self.digest is None or _tensor_versions(self.model) != self._versions):
                self._versions = _tensor_versions(self.model)
                self.digest = state_dict_digest(self.model)
                config = getattr(self.model, "config", None)
                self.encoder = encoder_identity(config) if config is not None else None
                _MEMORY_MODELS[self.digest] = self.model
            identity = {"digest": self.digest}
            if self.encoder is not None:
                identity["encoder"] = self.encoder
        else:
            ref = self.resolved_ref()
            if os.path.exists(ref):
                identity = {"digest": path_digest(ref)}
            else:
                identity = {"hub_id": ref, "revision": hub_commit(ref, self.revision) or self.revision or "main"}
            encoder = self._encoder_of_reference()
            if encoder is not None:
                identity["encoder"] = encoder
        self._identity = identity
        return identity

    def config_dict(self) -> dict | None:
        """The model's config as a dict, without loading weights: the object's, the folder's
        ``config.json``, or a Hub repo's cached ``config.json`` (None when none of these is at hand)."""
        if self.model is not None:
            config = getattr(self.model, "config", None)
            return config.to_dict() if hasattr(config, "to_dict") else None
        if self.memory_key is not None:
            return None
        ref = self.resolved_ref()
        if os.path.isdir(ref):
            return _read_json(os.path.join(ref, "config.json"))
        if os.path.exists(ref):
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json", revision=self.revision)
        except Exception:  # an invalid repo id, no huggingface_hub: nothing cached to read
            return None
        return _read_json(cached) if isinstance(cached, str) else None

    def _encoder_of_reference(self) -> dict | None:
        config = self.config_dict()
        if config is None or config.get("model_type") not in (None, "gemma_rvq"):
            return None
        return encoder_identity(config)

    def check_unchanged(self) -> None:
        """Raise when the weights changed after the identity was last handed out (``datasets`` then
        fingerprinted this transform with the old weights and would cache new tokens under it)."""
        if self._identity is None:
            return
        if self.model is not None:
            changed = _tensor_versions(self.model) != self._versions
        elif self.memory_key is not None:
            return  # a forked worker's copy: the parent checked it when it was pickled
        else:
            before = self._identity
            changed = not same_identity(before, self.identity())
            self._identity = before  # stays stale until a new fingerprint (identity()) is taken
        if changed:
            raise ValueError(
                f"the weights of {self!r} changed after this SpeechTokenizer computed its cache identity "
                "(datasets fingerprinted it with the old weights, so these tokens would be cached under the "
                "old identity). Build a new SpeechTokenizer after changing a model's weights or files."
            )

    def load_spec(self) -> dict:
        """How another process gets this model (pickled in place of the weights)."""
        if self.model is not None:
            return {"memory": self.identity()["digest"]}
        if self.memory_key is not None:
            return {"memory": self.memory_key}
        return {"ref": self.resolved_ref(), "revision": self.revision}

    @classmethod
    def from_load_spec(cls, spec: dict, identity: dict | None = None) -> ModelHandle:
        """The handle a worker unpickles; ``identity`` (what the parent fingerprinted) is checked against
        the files the worker finds (:meth:`check_unchanged`)."""
        handle = cls(spec.get("ref"), revision=spec.get("revision"))
        handle.memory_key = handle.digest = spec.get("memory")
        if identity is not None:
            handle.encoder = identity.get("encoder") if handle.memory_key is not None else None
            handle._identity = identity
        return handle

    def get(self, device: torch.device, dtype: torch.dtype | None,
            encoder_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The model, in eval mode, on ``device`` in ``dtype`` (its encoder in ``encoder_dtype`` when given),
        loaded once per process; the caller's own object is never moved or cast: a copy per (weights,
        device, dtypes) is kept instead."""
        model = self.model
        if model is None and self.memory_key is not None:
            model = _MEMORY_MODELS.get(self.memory_key)
            if model is None:
                raise RuntimeError(
                    "SpeechTokenizer was built from an in-memory model, and this process (started with "
                    "'spawn', or on another machine) cannot see it. Save it with model.save_pretrained(dir) "
                    "and pass SpeechTokenizer(dir, ...) instead."
                )
        if model is not None:
            if _fits(model, device, dtype, encoder_dtype):
                return model.eval()
            key = ("memory", self.identity()["digest"], str(device), str(dtype), str(encoder_dtype))
            with _LOAD_LOCK:
                if key not in _LOADED_MODELS:
                    _LOADED_MODELS[key] = place(copy.deepcopy(model), device, dtype, encoder_dtype)
                return _LOADED_MODELS[key]
        ref = self.resolved_ref()
        # the identity keeps a path whose weights changed from reusing the model loaded before
        key = (ref, json.dumps(self.identity(), sort_keys=True), str(device), str(dtype), str(encoder_dtype))
        with _LOAD_LOCK:
            if key not in _LOADED_MODELS:
                # the same weights already loaded in other dtypes (dtype="auto" timed them): copy, not reread
                sibling = next((m for k, m in _LOADED_MODELS.items() if k[:3] == key[:3]), None)
                if sibling is not None:
                    model = copy.deepcopy(sibling)
                else:
                    from .convert import load_any

                    logger.info("gemma-rvq: loading %s on %s", ref, device)
                    kwargs = {"revision": self.revision} if self.revision else {}
                    model = load_any(ref, **kwargs)
                _LOADED_MODELS[key] = place(model, device, dtype, encoder_dtype)
            return _LOADED_MODELS[key]


__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ENV_VAR",
    "ModelHandle",
    "encoder_identity",
    "hub_commit",
    "is_warm",
    "mark_warm",
    "path_digest",
    "place",
    "resolve_device",
    "same_identity",
    "state_dict_digest",
]
