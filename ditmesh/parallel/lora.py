"""LoRA adapters under ditmesh's strategies: never silently ignored.

diffusers loads a LoRA through peft: `load_lora_weights` replaces each targeted `nn.Linear`
(e.g. FLUX's `attn.to_q`) by a peft `BaseTunerLayer` that keeps the Linear as `base_layer` and
adds ``lora_B(lora_A(x)) * scaling``; `set_adapters` changes `scaling` and the active adapters,
`fuse_lora` merges the product into the base weight in place, `unload_lora_weights` puts the
Linear back. What each ditmesh step does about that:

- pipeline wrappers: diffusers' pipeline methods act only on components that are diffusers
  models (`issubclass(ModelMixin)`), so a ditmesh denoiser wrapper in `pipe.transformer` would
  make them skip it silently. `LORA_METHODS` of a wrapped pipeline run with the wrapped models
  put back for the call (`reach_models`);
- fused Q/K/V (`fastpath.fuse_qkv`): an attention module uses its fused projection only while
  it computes what the unfused ones would (`sync_fused_projections`, before every forward);
- CUDA graphs and compiled blocks: a graph is captured per adapter set (`adapter_state` is part of
  its key); dynamo guards the blocks on the adapter modules and scales (one recompile per set);
- tensor parallelism and PipeFusion refuse what they cannot follow, with a `ValueError` that
  names the fix: at `load_lora_weights` (`refuse_loads`) and, for calls that bypass the
  pipeline, at the next forward (`refuse_new_loras`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

from torch import nn


# Pipeline methods that read or change LoRA state (diffusers' LoraBaseMixin and family mixins).
LORA_METHODS = frozenset({
    "load_lora_weights", "load_lora_into_transformer", "set_adapters", "unload_lora_weights", "fuse_lora",
    "unfuse_lora", "disable_lora", "enable_lora", "delete_adapters", "get_active_adapters", "get_list_adapters",
    "set_lora_device", "enable_lora_hotswap",
})

_SEEN_ATTR = "_ditmesh_lora_seen"  # marks LoRA weights a strategy has already accounted for
_REFUSAL_ATTR = "_ditmesh_lora_refusal"  # on a model: why LoRAs cannot be loaded into it now
LOAD_METHODS = frozenset({"load_lora_weights", "load_lora_into_transformer", "enable_lora_hotswap"})


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every peft adapter layer in `model` (none when peft is not installed)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return iter(())
    return ((name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def adapter_state(model: nn.Module) -> tuple:
    """A hashable summary of `model`'s LoRA state: which layers hold adapters, which are active,
    merged or disabled, and their scales. Equal summaries give equal forwards (the adapter weights
    themselves are read from the same tensors); () without adapters."""
    return tuple(
        (name, id(layer), tuple(layer.active_adapters), tuple(layer.merged_adapters), bool(layer.disable_adapters),
         tuple(sorted(getattr(layer, "scaling", {}).items())))
        for name, layer in tuner_layers(model)
    )


def contributes(layer: nn.Module) -> bool:
    """Whether a (possibly adapted) Linear adds anything beyond its base weight in forward."""
    if not hasattr(layer, "base_layer") or getattr(layer, "disable_adapters", False):
        return False
    merged = set(layer.merged_adapters)
    return any(name in layer.lora_A and name not in merged for name in layer.active_adapters)


def base_linear(layer: nn.Module) -> nn.Module:
    """The plain Linear of a peft layer (the layer itself if it is plain)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


# ---- fused Q/K/V ------------------------------------------------------------------------------

# The projections diffusers concatenates into each fused one (AttentionModuleMixin.fuse_projections).
FUSED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fusable(model: nn.Module) -> bool:
    """Whether Q/K/V fusion applies to `model`: diffusers' current API only
    (`AttentionMixin.fuse_qkv_projections`), where the model keeps its own processors and they
    read `attn.fused_projections` (the legacy per-model versions swap in generic fused processors,
    and SD3's drops the QK RMSNorm of SD3.5: wrong outputs), and no processor projecting added K/V
    separately (diffusers refuses those)."""
    from diffusers.models.attention import AttentionMixin

    if getattr(type(model), "fuse_qkv_projections", None) is not AttentionMixin.fuse_qkv_projections:
        return False
    return not any("Added" in type(processor).__name__ for processor in model.attn_processors.values())


def fusable_attention(module: nn.Module) -> list[nn.Module]:
    """The attention modules under `module` whose Q/K/V diffusers can fuse (`fuse_projections`)."""
    from diffusers.models.attention import AttentionModuleMixin

    return [m for m in module.modules() if isinstance(m, AttentionModuleMixin) and m._supports_qkv_fusion]


def share_fused_storage(attn: nn.Module) -> None:
    """Make each projection's weight (and bias) a view into its fused projection's: the fused copy
    is then the only one (FLUX.1-dev: ~4 GiB less per GPU), and a LoRA merged into a projection in
    place (`fuse_lora`) changes the fused weight with it."""
    for fused_name, parts in FUSED_PARTS.items():
        fused = getattr(attn, fused_name, None)
        if fused is None:
            continue
        offset = 0
        for part in parts:
            linear = base_linear(getattr(attn, part))
            rows = linear.weight.shape[0]
            for pname in ("weight", "bias"):
                old = getattr(linear, pname)
                if old is not None:
                    view = getattr(fused, pname).data[offset:offset + rows]
                    setattr(linear, pname, nn.Parameter(view, requires_grad=old.requires_grad))
            offset += rows


def _still_fused(attn: nn.Module, fused_name: str, parts: tuple[str, ...]) -> bool:
    fused = getattr(attn, fused_name)
    offset = 0
    for part in parts:
        layer = getattr(attn, part)
        linear = base_linear(layer)
        view = fused.weight[offset:offset + linear.weight.shape[0]]
        # Same storage and offset: nothing replaced the weight (a safe merge or a reload does).
        if contributes(layer) or linear.weight.data_ptr() != view.data_ptr() or linear.weight.shape != view.shape:
            return False
        offset += linear.weight.shape[0]
    return True


def sync_fused_projections(attention_modules: list[nn.Module]) -> None:
    """Use each module's fused projection only while it equals the unfused ones: an unmerged
    LoRA on a part (or a part whose weight no longer is the fused one's view) turns it off."""
    for attn in attention_modules:
        attn.fused_projections = all(
            _still_fused(attn, fused_name, parts)
            for fused_name, parts in FUSED_PARTS.items() if getattr(attn, fused_name, None) is not None
        )


# ---- pipeline wrappers ---------------------------------------------------------------------------


def innermost(module: Any) -> Any:
    """The model inside ditmesh's denoiser wrappers (each holds the next as `inner` or `model`)."""
    while isinstance(module, nn.Module) and not hasattr(type(module), "load_lora_adapter"):
        inner = module._modules.get("inner") or module._modules.get("model")
        if inner is None:
            break
        module = inner
    return module


@contextlib.contextmanager
def models_in_place(pipe: Any) -> Iterator[None]:
    """Within: every LoRA-loadable component of `pipe` is the model itself, not a wrapper."""
    swapped = []
    for name in getattr(pipe, "_lora_loadable_modules", ()):
        wrapper = getattr(pipe, name, None)
        model = innermost(wrapper)
        if model is not wrapper:
            swapped.append((name, wrapper))
            setattr(pipe, name, model)
    try:
        yield
    finally:
        for name, wrapper in swapped:
            setattr(pipe, name, wrapper)


def reach_models(pipe: Any, name: str, value: Any) -> Any:
    """`value` (the attribute `name` of `pipe`) as a wrapped pipeline should return it: LoRA
    methods run with the wrapped models in place, so diffusers does not skip them."""
    if name not in LORA_METHODS or not callable(value):
        return value

    @functools.wraps(value)
    def call(*args: Any, **kwargs: Any) -> Any:
        if name in LOAD_METHODS:
            _check_loads(pipe)
        with models_in_place(pipe):
            return value(*args, **kwargs)

    return call


# ---- strategies that cannot follow a LoRA --------------------------------------------------------


def refuse_loads(model: nn.Module, message: str) -> None:
    """From now on, loading a LoRA into `model` through a wrapped pipeline raises `ValueError(message)`."""
    setattr(model, _REFUSAL_ATTR, message)


def _check_loads(pipe: Any) -> None:
    for name in getattr(pipe, "_lora_loadable_modules", ()):
        message = getattr(innermost(getattr(pipe, name, None)), _REFUSAL_ATTR, None)
        if message:
            raise ValueError(message)


def mark_seen(model: nn.Module) -> None:
    """Record the LoRA weights `model` holds now (see `refuse_new_loras`)."""
    for _, layer in tuner_layers(model):
        for lora_a in layer.lora_A.values():
            setattr(lora_a, _SEEN_ATTR, True)


def refuse_new_loras(model: nn.Module, strategy: str, fix: str) -> None:
    """Raise `ValueError` (naming `fix`) if `model` holds LoRA weights loaded since `mark_seen`."""
    new = [name for name, layer in tuner_layers(model)
           if any(not getattr(a, _SEEN_ATTR, False) for a in layer.lora_A.values())]
    if new:
        raise ValueError(f"{strategy} cannot apply LoRA adapters loaded after parallelize (on {short_list(new)}); {fix}")


def short_list(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# ---- loading from the command line ----------------------------------------------------------------


def adapter_name(path: str) -> str:
    """The adapter name a LoRA folder or file is loaded under: its stem, made a valid module key."""
    from pathlib import Path

    stem = Path(path).stem if Path(path).is_file() else Path(path).name
    return "".join(c if c.isalnum() else "_" for c in stem) or "lora"


def load_folder(pipe: Any, folder: str) -> list[str]:
    """Load every LoRA in `folder` (each a subfolder saved with `save_lora_weights`, or a
    ``.safetensors`` file) under its `adapter_name`, inactive; returns the names. A server loads
    them once so a request can name them (`activate`) without reading a client's path."""
    from pathlib import Path

    entries = sorted(p for p in Path(folder).expanduser().iterdir() if p.is_dir() or p.suffix == ".safetensors")
    if not entries:
        raise ValueError(f"no LoRA in {folder}; put folders saved with save_lora_weights or .safetensors files there")
    names = load(pipe, [(str(entry), 1.0) for entry in entries])
    return names


def unknown_names(requested: Any, known: list[str]) -> str | None:
    """The error for a request naming LoRAs the server did not load from its folder (None: all known)."""
    unknown = sorted(set(requested or ()) - set(known))
    if not unknown:
        return None
    return (f"unknown LoRA {', '.join(unknown)}; this server has "
            f"{', '.join(known) or 'none (start the server with a LoRA folder: --lora-dir)'}")


def activate(pipe: Any, adapters: dict[str, float]) -> None:
    """Make exactly `adapters` (name -> scale) the active LoRAs of `pipe`; none: LoRAs off.
    Each distinct set costs one recompile and one capture the first time (graphs are keyed by it)."""
    if not adapters:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(adapters), list(adapters.values()))


def load(pipe: Any, loras: list[tuple[str, float]]) -> list[str]:
    """Load each (path, scale) LoRA into `pipe` (plain or parallelized) and activate them all
    with their scales; returns the adapter names. Every rank must call it with the same list."""
    names = []
    for path, _ in loras:
        name = adapter_name(path)
        if name in names:
            raise ValueError(f"two LoRAs are both named {name!r}; rename one of the files or folders")
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])
    return names

