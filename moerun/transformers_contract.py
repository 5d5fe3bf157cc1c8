"""What moerun relies on inside transformers, below its public API, checked against the installed version.

moerun returns a transformers model and hooks into it: the fast decode path calls decoder layers and
attention modules directly with a static KV cache, replaces ``forward``/``generate``/
``create_masks_for_generate`` on the model, and builds masks with ``masking_utils``. These are
internals that change between transformers releases (5.25 renamed the KV-cache argument of every
``forward`` from ``past_key_values`` to ``cache``). Each assumption is named here once, with the check
that proves it on the installed version; a failed check says which transformers is installed and
which range moerun supports (the requirement in moerun's own package metadata, i.e. pyproject).

This module knows nothing about experts, policies or graphs.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect

# The KV-cache argument of the model's, decoder layers' and attention modules' forward, newest first.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


class TransformersMismatch(RuntimeError):
    """The installed transformers does not have an internal moerun relies on."""


def installed_version() -> str:
    import transformers

    return transformers.__version__


@functools.lru_cache(maxsize=1)
def supported_range() -> str:
    """The transformers requirement moerun declares (pyproject), e.g. ``">=5.17,<5.26"``."""
    try:
        requires = importlib.metadata.requires("moerun") or []
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "(moerun is not installed; see pyproject.toml)"
    for req in requires:
        name = req.split(";")[0].strip()
        if name.startswith("transformers") and not name[len("transformers"):][:1].isalnum():
            return name[len("transformers"):].strip() or "(any)"
    return "(not declared)"


def mismatch(what: str) -> TransformersMismatch:
    """An error for a missing internal, naming the installed version and the supported range."""
    return TransformersMismatch(
        f"transformers {installed_version()} {what}; moerun supports transformers {supported_range()}: "
        "install a version in that range"
    )


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def cache_argument(model) -> str:
    """The name under which this transformers passes the KV cache to ``model``'s forward, its decoder
    layers' and their attention modules' (moerun calls all three with it); raises
    :class:`TransformersMismatch` when they do not agree on one of :data:`CACHE_ARGUMENT_NAMES`."""
    decoder = model.get_decoder()
    layer = decoder.layers[0]
    where = {"the model's forward": type(model).forward, "the decoder's forward": type(decoder).forward,
             "a decoder layer's forward": type(layer).forward}
    attention = getattr(layer, "self_attn", None)
    if attention is not None:
        where["the attention's forward"] = type(attention).forward
    for name in CACHE_ARGUMENT_NAMES:
        if all(name in _parameters(fn) for fn in where.values()):
            return name
    found = {label: sorted(_parameters(fn) & set(CACHE_ARGUMENT_NAMES)) or "none" for label, fn in where.items()}
    raise mismatch(f"passes the KV cache under argument names moerun does not know ({found}; "
                   f"expected one of {list(CACHE_ARGUMENT_NAMES)} everywhere)")


def check_masks(cache_name: str) -> None:
    """``masking_utils.create_masks_for_generate`` takes the arguments the fast path gives it."""
    try:
        from transformers.masking_utils import create_masks_for_generate
    except ImportError:
        raise mismatch("has no transformers.masking_utils.create_masks_for_generate") from None
    needed = {"config", "inputs_embeds", "attention_mask", "position_ids", cache_name}
    missing = needed - _parameters(create_masks_for_generate)
    if missing:
        raise mismatch(f"has a create_masks_for_generate without the argument(s) {sorted(missing)}")


def check_static_cache() -> None:
    """``StaticCache(config=, max_cache_len=)`` with ``reset()``, ``layers`` and ``get_seq_length()``."""
    try:
        from transformers import StaticCache
    except ImportError:
        raise mismatch("has no StaticCache") from None
    missing = {"config", "max_cache_len"} - _parameters(StaticCache.__init__)
    missing |= {attr for attr in ("reset", "get_seq_length") if not callable(getattr(StaticCache, attr, None))}
    if missing:
        raise mismatch(f"has a StaticCache without {sorted(missing)}")


def check_output(cache_name: str) -> None:
    """``CausalLMOutputWithPast`` (what a fast-path step returns) carries the cache under ``cache_name``."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    if cache_name not in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}:
        raise mismatch(f"has a CausalLMOutputWithPast without a {cache_name!r} field")


def check_generate_loop(model) -> None:
    """What moerun's generate loop (runtime/decode_loop.py) calls: generate()'s ``custom_generate``
    callable, and the model's ``_prefill``, ``prepare_inputs_for_generation(next_sequence_length=)`` and
    ``_update_model_kwargs_for_generation`` with the arguments transformers' own loop gives them."""
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    needs = {"generate": {"custom_generate"},
             "_prefill": {"input_ids", "generation_config", "model_kwargs", "is_first_iteration"},
             "prepare_inputs_for_generation": {"input_ids", "next_sequence_length"},
             "_update_model_kwargs_for_generation": {"outputs", "model_kwargs", "is_encoder_decoder"}}
    for method, params in needs.items():
        missing = params - _parameters(getattr(type(model), method, None))
        if missing:
            raise mismatch(f"has no {method}() taking {sorted(missing)}")
    if not isinstance(getattr(StoppingCriteriaList, "max_length", None), property):
        raise mismatch("has a StoppingCriteriaList without max_length")


def fast_path_contract(model) -> str:
    """Check everything the fast decode path needs of transformers for ``model``; returns the KV-cache
    argument name. Raises :class:`TransformersMismatch` naming what is missing."""
    name = cache_argument(model)
    check_masks(name)
    check_static_cache()
    check_output(name)
    return name
