"""Which transformers ``generate`` modes may run a :class:`logitfuse.CoGenesisLogitsProcessor`.

A logits processor sees only ``input_ids`` and scores, not the mode of the ``generate`` call that runs
it. Greedy decoding, sampling and beam search call it once per step on kept tokens (beams: reordered
candidates of kept tokens). Prompt lookup and assisted decoding call it on *candidate* tokens before
they are verified (prompt lookup copies them from the private prompt): read as generated tokens they
would reach the LLM. transformers offers no public way for a processor to learn the mode, so the guard
reads the call stack (:func:`generation_problem`), and only on a transformers whose structure it knows:

- the version is in :data:`KNOWN_VERSIONS` (the range ``setup.py`` allows, :data:`REQUIREMENT`);
- :func:`structure_problems` finds what the stack walk relies on: ``GenerationMixin.generate`` in
  ``transformers.generation.utils`` keeps the mode in a local ``generation_mode``;
  ``GenerationConfig.get_generation_mode`` names greedy, sample, beam search, beam sample, and
  assisted generation for prompt lookup and for an assistant model; the loops ``_sample`` and
  ``_beam_search`` call the processors through ``LogitsProcessorList.__call__``.

On any other transformers :func:`check_transformers` raises :class:`UnsupportedTransformersError`
naming the version and what to do, instead of reading frames blindly. ``tests/decoding/test_guard.py``
is the contract test: it fails when the installed transformers changes this structure.
"""

from __future__ import annotations

import inspect
import sys

from packaging.version import Version

__all__ = ["KNOWN_VERSIONS", "REQUIREMENT", "SAFE_LOOPS", "SAFE_MODES", "UnsupportedTransformersError",
           "check_transformers", "generation_problem", "refuse_unsafe_generation", "structure_problems"]

KNOWN_VERSIONS = (Version("4.46"), Version("6"))  # [low, high): verified 4.46.3, 5.17.0, 5.25.0
REQUIREMENT = f"transformers>={KNOWN_VERSIONS[0]},<{KNOWN_VERSIONS[1]}"  # setup.py's install_requires line
GENERATE_MODULE = "transformers.generation.utils"
# the loops that call logits processors once per step on kept tokens, and the modes that run them
SAFE_LOOPS = frozenset({"_sample", "_beam_search"})
SAFE_MODES = frozenset({"greedy_search", "sample", "beam_search", "beam_sample"})
# frames between a loop and the processor's guard: logitfuse, torch's no_grad wrapper, the processor list
_PASS_THROUGH = ("logitfuse", "torch.utils._contextlib")


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is not one whose ``generate`` structure the guard knows."""


def structure_problems() -> list[str]:
    """What the stack walk relies on and the installed transformers lacks (empty: all there)."""
    from transformers import GenerationConfig
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.generation.utils import GenerationMixin

    def runs_in_frame(name: str, local: str) -> bool:  # the frame the walk sees: module, name, a local
        function = inspect.unwrap(getattr(GenerationMixin, name, None) or (lambda: None))  # under decorators
        return function.__globals__.get("__name__") == GENERATE_MODULE and function.__code__.co_name == name \
            and local in function.__code__.co_varnames

    problems = []
    if not runs_in_frame("generate", "generation_mode"):
        problems.append(f"{GENERATE_MODULE}.GenerationMixin.generate keeps no local 'generation_mode'")
    for loop in sorted(SAFE_LOOPS):
        if not runs_in_frame(loop, "logits_processor"):
            problems.append(f"{GENERATE_MODULE}.GenerationMixin.{loop} is missing or takes no logits_processor")
    if LogitsProcessorList.__call__.__module__ != "transformers.generation.logits_process":
        problems.append("LogitsProcessorList.__call__ moved out of transformers.generation.logits_process")
    expected = {"greedy_search": {}, "sample": {"do_sample": True}, "beam_search": {"num_beams": 2},
                "beam_sample": {"num_beams": 2, "do_sample": True},
                "assisted_generation": {"prompt_lookup_num_tokens": 3}}
    for mode, options in expected.items():
        try:
            got = getattr(GenerationConfig(**options).get_generation_mode(), "value", None)
        except Exception as error:  # an API change: report it, do not guess
            got = f"error {error!r}"
        if got != mode:
            problems.append(f"GenerationConfig({options}).get_generation_mode() is {got!r}, not {mode!r}")
    assisted = getattr(GenerationConfig().get_generation_mode(assistant_model=object()), "value", None)
    if assisted != "assisted_generation":
        problems.append(f"an assistant model gives generation mode {assisted!r}, not 'assisted_generation'")
    return problems


def check_transformers(version: str | None = None) -> None:
    """Raise :class:`UnsupportedTransformersError` unless ``version`` (default: the installed
    transformers') is in :data:`KNOWN_VERSIONS` and :func:`structure_problems` finds nothing."""
    if version is None:
        import transformers

        version = transformers.__version__
    if not KNOWN_VERSIONS[0] <= Version(str(version)) < KNOWN_VERSIONS[1]:
        why = f"it knows {REQUIREMENT}"
    elif problems := structure_problems():
        why = "its generate() changed: " + "; ".join(problems)
    else:
        return
    raise UnsupportedTransformersError(
        f"CoGenesisLogitsProcessor does not know transformers {version} ({why}). It reads the running generate()'s "
        "mode to refuse modes that would send private tokens to the LLM (prompt lookup, assisted decoding), and does "
        f"not read it blindly. Install a known version (pip install '{REQUIREMENT}'), or decode with "
        "logitfuse.generate, which runs its own loop")


def generation_problem(depth: int = 1) -> str | None:
    """Why the running ``generate`` call may not serve the processor, or ``None`` when it may.

    Walks the stack from ``depth`` frames above this one. The first frame outside logitfuse, torch's
    ``no_grad`` wrapper and ``LogitsProcessorList.__call__`` is the loop calling the processor; if any
    ``generate`` is running, that loop must be ``_sample`` or ``_beam_search`` and every running
    ``generate``'s mode one of :data:`SAFE_MODES` (an assistant model's own ``generate`` runs greedy
    inside an assisted one). Outside ``generate``, the caller's loop owns the documented contract
    (one call per kept token): ``None``.
    """
    frame, caller, modes = sys._getframe(depth + 1), None, []
    while frame is not None:
        module, name = frame.f_globals.get("__name__", ""), frame.f_code.co_name
        if caller is None and not module.startswith(_PASS_THROUGH) \
                and not (module == "transformers.generation.logits_process" and name == "__call__"):
            caller = f"{module}.{name}"
        if module == GENERATE_MODULE and name == "generate":
            mode = frame.f_locals.get("generation_mode")
            modes.append(getattr(mode, "value", mode))
        frame = frame.f_back
    if not modes:
        return None
    if caller not in {f"{GENERATE_MODULE}.{loop}" for loop in SAFE_LOOPS}:
        return f"generate() called the processor from {caller} (generation mode {modes[-1]!r})"
    unsafe = [mode for mode in modes if mode not in SAFE_MODES]
    return f"generate() runs generation mode {unsafe[-1]!r}" if unsafe else None


def refuse_unsafe_generation(depth: int = 1) -> None:
    """``ValueError`` if :func:`generation_problem` finds one (call it before anything is sent)."""
    problem = generation_problem(depth + 1)
    if problem is not None:
        raise ValueError(
            f"CoGenesisLogitsProcessor refused before anything was sent: {problem}. Prompt lookup "
            "(prompt_lookup_num_tokens) and assisted decoding (assistant_model) call logits processors on candidate "
            "tokens that are not generated and kept yet (prompt lookup copies them from the private prompt), so they "
            "could reach the LLM; use greedy decoding, sampling or beam search"
        )
